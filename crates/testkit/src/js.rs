//! The Node.js side of the tests: `tests/js` scenarios driven by the official socket.io-client.

use std::{path::PathBuf, process::Stdio, time::Duration};

use crate::fixture::repo_root;

/// How long one scenario may run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(600);

/// `tests/js`, with its packages installed; fails the test when they are not.
pub fn js_dir() -> PathBuf {
    let dir = repo_root().join("tests/js");
    assert!(
        dir.join("node_modules/socket.io-client").exists(),
        "tests/js/node_modules is missing: run `npm ci` in tests/js (scripts/provision does)"
    );
    dir
}

/// Runs one Node.js scenario (`node --test tests/js/{script}`) against `urls`; panics with its
/// output when it fails.
pub async fn run_js(script: &str, urls: &[String], env: &[(&str, String)]) {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("--test")
        .arg("--test-reporter=spec")
        .arg(js_dir().join(script))
        .env("CHORUS_URLS", urls.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(SCENARIO_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {SCENARIO_LIMIT:?}"))
        .expect("node is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {script} ---\n{stdout}\n{stderr}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}
