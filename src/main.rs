//! The chorus binary: load settings, set up logging, run one node until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::{Context, bail};
use chorus::config::{LogFormat, Settings};

fn config_path() -> anyhow::Result<Option<PathBuf>> {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => {
                path = Some(PathBuf::from(
                    args.next().context("--config needs a file path")?,
                ));
            }
            other if other.starts_with("--config=") => {
                path = Some(PathBuf::from(&other["--config=".len()..]));
            }
            "-h" | "--help" => {
                println!("usage: chorus [--config FILE]\nsettings: README.md#configuration");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: chorus [--config FILE])"),
        }
    }
    Ok(path)
}

fn init_logging(settings: &Settings) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.level))
        .context("invalid log.level")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match settings.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
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
    let path = config_path()?;
    let settings = Settings::load(path.as_deref()).context("failed to load settings")?;
    init_logging(&settings)?;
    let app = chorus::app::build(settings)
        .await
        .context("failed to start the node")?;
    let node = tracing::info_span!("node", id = %app.node_id());
    println!("chorus listening on http://{}", app.local_addr());
    let _entered = node.enter();
    app.run_until(shutdown_signal()).await;
    Ok(())
}
