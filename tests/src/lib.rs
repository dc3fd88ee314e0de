//! Harness for the end-to-end tests: runs the real `trustdrift` binary (as built by
//! `cargo xtask build`) against real programs, and cleans up every process, file and
//! mount it creates, even when a test fails.
//!
//! With `CI=true`, a test that cannot load the probe fails; elsewhere it says why it is
//! skipped (typically: not root).

use std::{
    env,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

pub use serde_json::Value;

/// The trustdrift binary under test.
pub fn trustdrift_bin() -> PathBuf {
    if let Some(bin) = env::var_os("TRUSTDRIFT_BIN") {
        return PathBuf::from(bin);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/trustdrift");
    assert!(
        bin.exists(),
        "no trustdrift binary at {}: run `cargo xtask build` (or `cargo xtask test`)",
        bin.display()
    );
    bin
}

fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// This machine cannot load the probe: in CI that fails the test, elsewhere it is a skip.
fn probe_unavailable<T>(reason: &str) -> Option<T> {
    if in_ci() {
        panic!("CI=true and the probe cannot be loaded: {reason}");
    }
    eprintln!("SKIPPED: the probe cannot be loaded here ({reason}); run as root to test it");
    None
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = env::temp_dir().join(format!(
            "trustdrift-e2e-{name}-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_ne_bytes(b)
}

/// A child process killed and reaped on drop.
pub struct Guarded(pub Child);

impl Guarded {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit",
                self.pid()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its stdin held open (it stays until dropped) and returns once it
/// printed `read`: a program that loaded what it reads at start, then runs on.
pub fn spawn_after_read(cmd: &mut Command) -> Guarded {
    let mut child = Guarded::spawn(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()));
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("reading the first line");
    assert_eq!(line.trim(), "read", "{cmd:?} started");
    child
}

/// A process (python3) that reads `path` once and then stays, like a service that loaded
/// its trust store at start. Returns once it has read.
pub fn python_reader(path: &Path) -> Guarded {
    let script = format!(
        "import sys\nopen({:?}, 'rb').read()\nprint('read', flush=True)\nsys.stdin.read()",
        path.to_str().expect("a UTF-8 path")
    );
    spawn_after_read(Command::new("/usr/bin/python3").args(["-I", "-c", &script]))
}

/// A TLS server (python3 `ssl`) that loads its certificate and key once.
pub fn python_tls_server(cert: &Path, key: &Path) -> Guarded {
    let script = format!(
        "import ssl, sys\nctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain({:?}, {:?})\nprint('read', flush=True)\nsys.stdin.read()",
        cert.to_str().expect("a UTF-8 path"),
        key.to_str().expect("a UTF-8 path")
    );
    spawn_after_read(Command::new("/usr/bin/python3").args(["-I", "-c", &script]))
}

/// A long-running TLS agent (python3 `ssl`): builds its context once at start and again
/// on SIGHUP, printing "loaded" each time; runs until its stdin closes. Arguments: the
/// role, then its files: `client BUNDLE` (`create_default_context(cafile=BUNDLE)`),
/// `default -` (the system's default CA store), `server CERT KEY`.
pub const TLS_AGENT: &str = r#"
import os, signal, ssl, sys
role, first, second = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
def load(*_):
    global ctx
    if role == "client":
        ctx = ssl.create_default_context(cafile=first)
    elif role == "default":
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(first, second)
    # Unbuffered: the handler may run while the main thread is inside a write.
    os.write(1, b"loaded\n")
signal.signal(signal.SIGHUP, load)
load()
sys.stdin.read()
"#;

/// A process that prints "loaded" each time it (re)loads its trust material and reloads
/// on SIGHUP, as services do: [`TLS_AGENT`], run however a test needs it.
pub struct Reloading {
    child: Guarded,
    loaded: mpsc::Receiver<()>,
}

impl Reloading {
    /// Starts `cmd` (stdin held open, stdout read here) and returns once it has loaded.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = Guarded::spawn(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()));
        let stdout = child.0.stdout.take().expect("piped");
        let (tx, loaded) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "loaded" && tx.send(()).is_err() {
                    break;
                }
            }
        });
        let me = Self { child, loaded };
        me.wait_loaded();
        me
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn wait_loaded(&self) {
        self.loaded
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent loaded its trust material");
    }

    /// SIGHUP, as operators reload a service; returns once it reloaded.
    pub fn reload(&self) {
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        self.wait_loaded();
    }
}

impl Drop for Reloading {
    /// Its stdin closed first: it ends on its own before [`Guarded`] kills it.
    fn drop(&mut self) {
        drop(self.child.0.stdin.take());
    }
}

#[derive(Default)]
struct Lines {
    records: Vec<Value>,
    stderr: String,
    attached: bool,
    closed: bool,
}

/// A running `trustdrift trace --json`, its records collected as they arrive.
pub struct Trace {
    child: Guarded,
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

impl Trace {
    /// Starts `trustdrift trace --json` with `args` and waits until the probe is attached;
    /// `None` (a skip) when the probe cannot be loaded outside CI.
    pub fn start(args: &[&str]) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return probe_unavailable("not running as root");
        }
        let mut cmd = Command::new(trustdrift_bin());
        cmd.args(["--log", "info", "trace", "--json", "--interval-ms", "100"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Guarded::spawn(&mut cmd);
        let lines = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let stdout = child.0.stdout.take().expect("piped stdout");
        let stderr = child.0.stderr.take().expect("piped stderr");
        let out_lines = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let (lock, cv) = &*out_lines;
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    lock.lock().unwrap().records.push(v);
                    cv.notify_all();
                }
            }
            let (lock, cv) = &*out_lines;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let err_lines = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, cv) = &*err_lines;
                let mut l = lock.lock().unwrap();
                if line.contains("probe attached") {
                    l.attached = true;
                }
                l.stderr.push_str(&line);
                l.stderr.push('\n');
                cv.notify_all();
            }
        });
        let trace = Self { child, lines };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (lock, cv) = &*trace.lines;
        let mut l = lock.lock().unwrap();
        while !l.attached {
            if l.closed || Instant::now() > deadline {
                let err = l.stderr.clone();
                drop(l);
                return probe_unavailable(&format!("trustdrift trace failed to start: {err}"));
            }
            l = cv.wait_timeout(l, Duration::from_millis(100)).unwrap().0;
        }
        drop(l);
        Some(trace)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Every record so far.
    pub fn records(&self) -> Vec<Value> {
        self.lines.0.lock().unwrap().records.clone()
    }

    /// Waits for a record matching `pred`; panics with everything seen after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut l = lock.lock().unwrap();
        loop {
            if let Some(v) = l.records.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let now = Instant::now();
            if now >= deadline || l.closed {
                panic!(
                    "no record {what} within {timeout:?}; records:\n{}\nstderr:\n{}",
                    l.records
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    l.stderr
                );
            }
            l = cv.wait_timeout(l, deadline - now).unwrap().0;
        }
    }

    /// Stops the trace with SIGINT (as Ctrl-C does); returns its exit status and the final
    /// summary record.
    pub fn stop(mut self) -> (std::process::ExitStatus, Value) {
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGINT) };
        let status = self.child.wait(Duration::from_secs(20));
        let summary = self.wait_for("summary", Duration::from_secs(5), |v| {
            v["event"] == "summary"
        });
        (status, summary)
    }
}

/// Records of `pid` for `path` (as written).
pub fn records_for<'a>(records: &'a [Value], pid: u32, path: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|v| v["pid"] == pid && v["path"] == path)
        .collect()
}

/// The default wait for a record to show up.
pub const SOON: Duration = Duration::from_secs(15);

/// A python3 interpreter, resolved once (a pyenv shim would exec through bash first).
pub fn python3() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed by the tests (cargo xtask setup installs it)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A self-signed certificate and key made by the real openssl: (cert.pem, key.pem).
pub fn make_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed by the tests (cargo xtask setup installs it)");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// A running `trustdrift run` on a free loopback port, stopped on drop.
pub struct Daemon {
    child: Guarded,
    pub port: u16,
    stderr: Arc<Mutex<String>>,
    /// Its state directory (removed on drop unless the test provided it).
    _state: Option<TempDir>,
}

/// Where a test daemon keeps its state and pins its probe.
#[derive(Default)]
pub struct DaemonSetup<'a> {
    /// `None`: a private temporary state dir.
    pub state_dir: Option<&'a Path>,
    /// `None`: no pinning (parallel test daemons must not share pins).
    pub pin_dir: Option<&'a Path>,
    /// Extra environment for the daemon.
    pub env: Vec<(&'a str, String)>,
    /// Another address to listen on besides the test's loopback port (a unix socket).
    pub also_listen: Option<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Daemon {
    /// Starts the daemon with `args` and waits until it serves verdicts; `None` (a skip)
    /// when the probe cannot be loaded outside CI.
    pub fn start(args: &[&str]) -> Option<Self> {
        Self::start_with(args, DaemonSetup::default())
    }

    pub fn start_with(args: &[&str], setup: DaemonSetup<'_>) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return probe_unavailable("not running as root");
        }
        let port = free_port();
        let own_state = setup.state_dir.is_none().then(|| TempDir::new("state"));
        let state_dir = setup
            .state_dir
            .map(Path::to_path_buf)
            .or_else(|| own_state.as_ref().map(|t| t.path().to_path_buf()))
            .expect("a state dir");
        let mut cmd = Command::new(trustdrift_bin());
        let mut listen = format!("127.0.0.1:{port}");
        if let Some(extra) = &setup.also_listen {
            listen = format!("{listen},{extra}");
        }
        cmd.args(["--log", "info", "run", "--listen"])
            .arg(listen)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--pin-dir")
            .arg(setup.pin_dir.map_or(PathBuf::new(), Path::to_path_buf))
            .args(args)
            .envs(setup.env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = Guarded::spawn(&mut cmd);
        let stderr_pipe = child.0.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut daemon = Self {
            child,
            port,
            stderr,
            _state: own_state,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if daemon.stderr.lock().unwrap().contains("serving verdicts") {
                break;
            }
            let exited = matches!(daemon.child.0.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                thread::sleep(Duration::from_millis(100));
                let err = daemon.stderr.lock().unwrap().clone();
                return probe_unavailable(&format!("trustdrift run did not start: {err}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Some(daemon)
    }

    /// GET `path` on the API: (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        http_get(self.port, path)
    }

    /// `GET /processes`, as an array.
    pub fn processes(&self) -> Vec<Value> {
        let (status, body) = self.get("/processes");
        assert_eq!(status, 200, "{body}");
        body.as_array().cloned().unwrap_or_default()
    }

    /// The process `pid` as `/processes` lists it, if it is listed.
    pub fn process(&self, pid: u32) -> Option<Value> {
        self.processes().into_iter().find(|p| p["pid"] == pid)
    }

    /// Waits until process `pid` is listed and `pred` holds for it; panics with what the
    /// daemon last said about it.
    pub fn wait_for(&self, what: &str, pid: u32, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SOON;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.process(pid);
            if let Some(p) = &last {
                if pred(p) {
                    return p.clone();
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let log = self.log();
        panic!(
            "process {pid} never became {what}; last seen as:\n{}\ndaemon log:\n{log}",
            last.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                .unwrap_or_else(|| "(not listed)".into()),
        );
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(self.child.pid() as i32, signal) };
    }

    /// SIGKILL, as a crash or an OOM kill: no chance to save or clean up.
    pub fn kill(mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only signal a daemon still running: a reaped pid may belong to someone else.
        if let Ok(None) = self.child.0.try_wait() {
            self.signal(libc::SIGTERM);
            let _ = self.child.wait(Duration::from_secs(20));
        }
    }
}

/// A minimal HTTP/1.1 GET on loopback (the API answers with a Content-Length).
pub fn http_get(port: u16, path: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("sending");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading");
    http_response(&raw)
}

/// An HTTP/1.x response read to its end: (status, JSON body, or the text if not JSON);
/// status 0 when there is none.
pub fn http_response(raw: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, body)
}

/// A CA (or a leaf signed by one) made in-process, with exact validity.
pub struct Cert {
    pub pem: String,
    pub key_pem: String,
    pub sha256: String,
    pub subject_cn: String,
    params_issuer: Option<rcgen::Issuer<'static, rcgen::KeyPair>>,
}

fn fingerprint(der: &[u8]) -> String {
    // The tests check the daemon's fingerprints against an independent computation.
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(der)?;
            c.wait_with_output()
        })
        .expect("openssl dgst");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Cert {
    /// A self-signed CA named `cn`, valid for a day.
    pub fn ca(cn: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1);
        let cert = params.self_signed(&key).expect("self-signed");
        let pem = cert.pem();
        let sha256 = fingerprint(cert.der());
        let key_pem = key.serialize_pem();
        Self {
            pem,
            key_pem,
            sha256,
            subject_cn: cn.to_owned(),
            params_issuer: Some(rcgen::Issuer::new(params, key)),
        }
    }

    /// A leaf for `dns` signed by this CA, valid until `valid_for` from now.
    pub fn leaf(&self, dns: &str, valid_for: Duration) -> Self {
        let issuer = self.params_issuer.as_ref().expect("a CA can sign");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, dns);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::try_from(valid_for).expect("duration");
        let cert = params.signed_by(&key, issuer).expect("signed");
        Self {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: fingerprint(cert.der()),
            subject_cn: dns.to_owned(),
            params_issuer: None,
        }
    }
}

/// Replaces `path` atomically (write a temp file, rename over), as package managers and
/// update-ca-certificates do.
pub fn replace_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, content).expect("writing the new version");
    std::fs::rename(&tmp, path).expect("renaming over the old version");
}
