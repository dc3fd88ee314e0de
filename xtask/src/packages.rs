//! Debian packages of the programs the tests drive for real. Installed when missing (CI
//! runs as root on a clean machine); elsewhere a missing one is a clear error.

use anyhow::{Result, bail};

use crate::workspace::command;

/// (command the tests run, Debian package that provides it)
const NEEDED: &[(&str, &str)] = &[
    ("python3", "python3"),
    ("openssl", "openssl"),
    ("curl", "curl"),
    // promtool checks the /metrics exposition and the alert rules; a real Prometheus and
    // Alertmanager prove the alerts fire.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    // The scenarios: a TLS proxy, a JVM, the Debian way of adding a CA, namespaces.
    ("nginx", "nginx-light"),
    ("javac", "default-jdk-headless"),
    ("keytool", "default-jdk-headless"),
    ("update-ca-certificates", "ca-certificates"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
];

fn present(program: &str) -> bool {
    command("sh", &["-c", &format!("command -v {program}")])
        .output()
        .is_some()
}

pub fn ensure_for_tests() -> Result<()> {
    ensure(NEEDED)
}

/// Installs the Debian packages of the `(program, package)` pairs whose program is
/// missing (as root), or says which command would.
pub fn ensure(needed: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = needed
        .iter()
        .filter(|(program, _)| !present(program))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the tests need {}: run `sudo apt-get install -y {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    command("apt-get", &["update", "-qq"]).run("apt-get update")?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    command("apt-get", &args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run(&format!("installing {}", missing.join(" ")))
}
