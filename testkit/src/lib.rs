//! What the end-to-end tests (`tests/`) and the benchmarks (`bench/`) share, each once:
//! the real `trustdrift` binary under test ([`Daemon`], [`Trace`]), the processes and
//! directories they create, killed and removed on every way out ([`Guarded`],
//! [`TempDir`]), HTTP on loopback, and certificates.
//!
//! With `CI=true` ([`in_ci`]), a test that cannot load the probe fails; elsewhere it says
//! why it is skipped (typically: not root).
//!
//! Helpers come in the tests' style, panicking with a message, and where the benchmarks
//! need it with a `try_` twin returning an error instead: a benchmark reports a failure
//! and cleans up, it does not unwind.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub use serde_json::Value;

mod certs;
mod daemon;
mod http;
pub mod interrupt;
mod process;
mod tempdir;
mod trace;

pub use certs::{
    Cert, bundle, make_certificate, minimal_certificates, replace_atomically, sha256_hex,
    sha256_of, try_replace_atomically,
};
pub use daemon::{Api, Daemon, DaemonSetup, StartError, shas};
pub use http::{free_port, http_get, http_response, try_free_port, try_http_get};
pub use process::{
    Guarded, Reloading, TLS_AGENT, python_reader, python_tls_server, python3, spawn_after_read,
};
pub use tempdir::{PinDir, TempDir};
pub use trace::{Trace, records_for};

/// The default wait for something the daemon or the probe reports to show up.
pub const SOON: Duration = Duration::from_secs(15);

/// The workspace's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// The trustdrift binary under test: `TRUSTDRIFT_BIN` (set by `cargo xtask`), else the
/// release build in the target directory.
pub fn trustdrift_bin() -> PathBuf {
    if let Some(bin) = env::var_os("TRUSTDRIFT_BIN") {
        return PathBuf::from(bin);
    }
    let bin = target_dir().join("release/trustdrift");
    assert!(
        bin.exists(),
        "no trustdrift binary at {}: run `cargo xtask build` (or `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// `CI=true` (or `1`): whatever a test needs must be there, and a test that cannot run
/// fails instead of being skipped.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// This machine cannot load the probe: in CI that fails the test, elsewhere it is a skip.
pub fn probe_unavailable<T>(reason: &str) -> Option<T> {
    if in_ci() {
        panic!("CI=true and the probe cannot be loaded: {reason}");
    }
    eprintln!("SKIPPED: the probe cannot be loaded here ({reason}); run as root to test it");
    None
}

/// Whether `program` is on the PATH.
pub fn has_program(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn random_bytes(b: &mut [u8]) {
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    u64::from_ne_bytes(b)
}

/// `bytes` random bytes in lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    random_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
