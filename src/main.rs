//! The chorus binary: load settings, set up logging, run one node until SIGTERM or SIGINT.
//! `chorus healthcheck [--ready]` asks a running node on this host whether it is alive (ready).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, bail};
use chorus::config::Settings;

const USAGE: &str = "usage: chorus [--config FILE]\n       chorus healthcheck [--ready] [--config FILE]\nsettings: README.md#configuration";

/// What the command line asks for.
struct Command {
    config: Option<PathBuf>,
    /// `Some(path)`: probe the local node's `path` instead of running a node.
    probe: Option<&'static str>,
}

fn command() -> anyhow::Result<Command> {
    let mut args = std::env::args().skip(1).peekable();
    let mut cmd = Command {
        config: None,
        probe: None,
    };
    if args.peek().map(String::as_str) == Some("healthcheck") {
        args.next();
        cmd.probe = Some("/healthz");
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ready" if cmd.probe.is_some() => cmd.probe = Some("/readyz"),
            "--config" => {
                cmd.config = Some(PathBuf::from(
                    args.next().context("--config needs a file path")?,
                ));
            }
            other if other.starts_with("--config=") => {
                cmd.config = Some(PathBuf::from(&other["--config=".len()..]));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(cmd)
}

/// GETs `path` from the node on this host's configured port; Ok when it answers 200.
/// For container health checks, where no HTTP client is installed.
fn probe(settings: &Settings, path: &str) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], settings.port));
    let timeout = Duration::from_secs(3);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
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
    let cmd = command()?;
    let settings = Settings::load(cmd.config.as_deref()).context("failed to load settings")?;
    if let Some(path) = cmd.probe {
        return probe(&settings, path);
    }
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
