//! The chorus binary: load settings, set up logging, run one node until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::{Context, bail};
use chorus::config::Settings;

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
