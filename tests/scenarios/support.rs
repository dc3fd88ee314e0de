//! What every scenario needs beyond the e2e harness: timing how long the daemon took to
//! notice, and a program's presence checked with the install command in the message.

use std::{
    fs::OpenOptions,
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

pub use trustdrift_e2e::shas;
use trustdrift_e2e::{Daemon, Guarded, Value, free_port, has_program};

/// Held by scenarios that flood the machine (the storm) or count machine-wide events:
/// each daemon sees every process, so the two must not overlap.
pub fn alone() -> MutexGuard<'static, ()> {
    static MACHINE: Mutex<()> = Mutex::new(());
    MACHINE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails (never skips) when `program` is missing, saying how to install it.
pub fn require(program: &str, package: &str) {
    assert!(
        has_program(program),
        "{program} is needed by this scenario: apt-get install -y {package} \
         (cargo xtask setup installs it)"
    );
}

/// Waits until process `pid` satisfies `pred` and records how long that took since
/// `since` (the moment the world changed).
pub fn noticed(
    daemon: &Daemon,
    scenario: &str,
    what: &str,
    pid: u32,
    since: Instant,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let p = daemon.wait_for(what, pid, pred);
    record(scenario, what, since.elapsed());
    p
}

/// Prints and appends one detection latency.
pub fn record(scenario: &str, what: &str, took: Duration) {
    eprintln!(
        "scenario {scenario}: noticed {what} after {} ms",
        took.as_millis()
    );
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("scenario-latency.jsonl");
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(
            f,
            "{}",
            serde_json::json!({"scenario": scenario, "what": what, "ms": took.as_millis() as u64})
        );
    }
}

/// The file entry of `p` for `path` as written.
pub fn file<'a>(p: &'a Value, path: &str) -> &'a Value {
    p["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == path))
        .unwrap_or_else(|| panic!("{path} not among the files of {p}"))
}

/// Series of `family` in a /metrics text that contain every one of `labels`.
pub fn series<'a>(metrics: &'a str, family: &str, labels: &[&str]) -> Vec<&'a str> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .collect()
}

/// `openssl s_server` on a free loopback port with `cert` and `key` (and `options`),
/// returned once it listens.
pub fn openssl_server(options: &[&str], cert: &Path, key: &Path) -> (Guarded, u16) {
    let port = free_port();
    (openssl_server_on(port, options, cert, key), port)
}

/// `openssl s_server` on loopback `port` (a restarted server takes its predecessor's),
/// returned once it listens. Its stdin is held open for its life: an EOF there is a
/// request to quit for s_server.
pub fn openssl_server_on(port: u16, options: &[&str], cert: &Path, key: &Path) -> Guarded {
    let server = Guarded::spawn(
        Command::new("openssl")
            .arg("s_server")
            .args(options)
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    server
}
