//! The command line as a user meets it: help, version, and a clear refusal of what it does not
//! know. (Its scenarios run in the root package's tests, `the_benchmark_runs`, which also needs
//! this test target: it makes `cargo test --workspace` build the bench binary.)

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chorus-bench"))
        .args(args)
        .output()
        .expect("run chorus-bench")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_lists_every_scenario() {
    let out = bench(&["--help"]);
    assert!(out.status.success());
    let help = stdout(&out);
    for scenario in [
        "all",
        "ramp",
        "fanout",
        "connect",
        "store",
        "raw-inserts",
        "replay",
        "cpu",
        "trivial-server",
        "floor-server",
    ] {
        assert!(help.contains(scenario), "{scenario} is not in:\n{help}");
    }
    for option in [
        "--system",
        "--nodes",
        "--quick",
        "--pg",
        "--redis",
        "--server-cpu",
    ] {
        assert!(help.contains(option), "{option} is not in:\n{help}");
    }
    let fanout = stdout(&bench(&["fanout", "--help"]));
    for option in [
        "--connections",
        "--senders",
        "--rate",
        "--seconds",
        "--quick",
    ] {
        assert!(fanout.contains(option), "{option} is not in:\n{fanout}");
    }
}

#[test]
fn version_is_the_package_version() {
    let out = bench(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("chorus-bench {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_scenarios_and_options_are_refused() {
    for args in [&["nothing"][..], &["all", "--fast"], &[]] {
        let out = bench(args);
        assert_eq!(out.status.code(), Some(2), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Usage"), "{args:?}: {stderr}");
    }
}
