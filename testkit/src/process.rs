//! Processes a test starts, killed and reaped on every way out, and the programs the
//! tests drive: readers that load their trust material once, TLS agents that reload it
//! on SIGHUP.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

/// A child process killed and reaped on drop.
pub struct Guarded(pub Child);

impl Guarded {
    /// Spawns `cmd`. An executable the test has just written can be "busy" for a moment:
    /// another test thread that forked while its write fd was open holds a copy until
    /// that child execs (ETXTBSY), so that is retried briefly.
    pub fn spawn(cmd: &mut Command) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match cmd.spawn() {
                Ok(child) => return Self(child),
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spawning {cmd:?}: {e}"),
            }
        }
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

/// A python3 interpreter, resolved once (a pyenv shim would exec through bash first).
pub fn python3() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is needed by the tests (cargo xtask setup installs it)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
