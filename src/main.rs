//! The chorus binary: parse the command line, load settings, set up logging, then serve until
//! SIGTERM or SIGINT, apply the migrations, or probe a running node for a container health check.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, bail};
use chorus::config::Settings;
use clap::{Parser, Subcommand};

/// A horizontally scalable Socket.IO chat server. Settings: defaults, then `--config FILE`,
/// then environment variables (README.md, "Configuration").
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file of settings, between the defaults and the environment.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the chat until SIGTERM or SIGINT (what `chorus` alone does).
    Serve,
    /// Apply the database migrations and exit (serving applies them too).
    Migrate,
    /// Ask the node on this host whether it is alive; exits non-zero when it is not.
    Healthcheck {
        /// Ask whether it is ready for clients (`/readyz`) instead of alive (`/healthz`).
        #[arg(long)]
        ready: bool,
    },
}

/// How long the health check waits for each step.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// GETs `path` from the node on this host's configured port; Ok when it answers 200.
/// For container health checks, where no HTTP client is installed.
fn probe(settings: &Settings, path: &str) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], settings.port));
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).context("read the answer")?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status = status_line.split_whitespace().nth(1).unwrap_or("none");
    if status != "200" {
        bail!("{path} on {addr} answered {status}");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the node can still be stopped by killing it.
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref()).context("failed to load settings")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Healthcheck { ready } => {
            probe(&settings, if ready { "/readyz" } else { "/healthz" })
        }
        Command::Migrate => {
            chorus::logging::init(settings.log.format, &settings.log.level)?;
            let store = chorus::store::connect(&settings)
                .await
                .context("failed to migrate the database")?;
            store.close().await;
            println!("migrations applied to {}", redacted(&settings.database_url));
            Ok(())
        }
        Command::Serve => {
            if let Some(id) = &settings.node_id {
                chorus::logging::set_node(id);
            }
            chorus::logging::init(settings.log.format, &settings.log.level)?;
            let app = chorus::app::build(settings)
                .await
                .context("failed to start the node")?;
            println!("chorus listening on http://{}", app.local_addr());
            app.run_until(shutdown_signal()).await;
            Ok(())
        }
    }
}

/// A database URL without its password, for output.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redacted("postgres://chorus:s3cret@db:5432/chat"),
            "postgres://chorus:***@db:5432/chat"
        );
        assert_eq!(
            redacted("postgres://postgres@127.0.0.1/chat"),
            "postgres://postgres@127.0.0.1/chat"
        );
        assert_eq!(redacted("sqlite://chorus.db"), "sqlite://chorus.db");
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["chorus", "healthcheck", "--ready", "--config", "c.toml"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Healthcheck { ready: true })
        ));
        assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("c.toml")));
        assert!(Cli::try_parse_from(["chorus"]).unwrap().command.is_none());
        assert!(Cli::try_parse_from(["chorus", "--bogus"]).is_err());
    }
}
