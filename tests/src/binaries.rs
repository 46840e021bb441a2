//! Workspace binaries for the tests that run real processes, built before
//! they run.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The path of a workspace binary, built first so it is never stale. The
/// build runs off the test's runtime: blocking it for the length of a build
/// would starve the broker connection's heartbeats.
pub async fn binary(name: &str) -> PathBuf {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || binary_blocking(&name))
        .await
        .expect("the build task did not panic")
}

/// [`binary`], for tests without a runtime.
pub fn binary_blocking(name: &str) -> PathBuf {
    static BUILD_LOCK: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    let _guard = BUILD_LOCK
        .get_or_init(Default::default)
        .lock()
        .expect("no build panicked");
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // <target>/<profile>/deps/<test binary>, or <target>/<profile>/<binary>
    // for a workspace binary such as flotilla-bench.
    let parent = exe
        .parent()
        .expect("binaries live in <target>/<profile>[/deps]");
    let profile_dir = match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps") => parent
            .parent()
            .expect("test binaries live in <target>/<profile>/deps"),
        _ => parent,
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace");
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--quiet", "--profile", profile, "--bin", name])
        .current_dir(workspace);
    // Cargo gives a test process its package's variables (CARGO_MANIFEST_DIR
    // and the like). A build that inherits them sees a changed environment
    // and rebuilds ring and everything above it, and the next `cargo test`
    // rebuilds it all back: minutes on two cores.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|key| {
            [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_BIN_",
                "CARGO_TARGET_TMPDIR",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        }) {
            build.env_remove(key);
        }
    }
    let status = build.status().expect("running cargo build");
    assert!(status.success(), "cargo build --bin {name} failed");
    profile_dir.join(name)
}
