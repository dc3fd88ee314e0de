//! A `trustdrift run` under test: its own loopback port, state directory, (empty unless
//! given) configuration file and log, no pinning unless asked, none of this process's
//! `TRUSTDRIFT_*` variables; stopped with SIGTERM when dropped, and killed with this
//! process's thread that started it if that dies without dropping it. It starts no
//! thread of its own: the benchmarks fork their workloads, which is only sound in a
//! single-threaded process.

use std::{
    ffi::OsStr,
    fmt, fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{SOON, TempDir, interrupt, is_root, probe_unavailable, trustdrift_bin};

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

/// Why a daemon did not start.
#[derive(Debug)]
pub enum StartError {
    /// It cannot load the probe here (not root), or exited or stayed silent before
    /// serving verdicts: for a test, a skip outside CI.
    Unavailable(String),
    /// Anything else (it could not be started; its API never became ready).
    Failed(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(why) => write!(f, "{why}"),
            Self::Failed(why) => write!(f, "trustdrift run: {why}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running `trustdrift run` on a free loopback port, stopped on drop.
pub struct Daemon {
    child: Child,
    pub port: u16,
    log: PathBuf,
    exited: bool,
    /// Its log, configuration and (unless the caller gave one) state directory; removed
    /// after the process is gone.
    _dir: TempDir,
}

/// How long a daemon may take to serve verdicts, then to answer `/readyz`.
const START: Duration = Duration::from_secs(60);
const READY: Duration = Duration::from_secs(10);
/// How long a SIGTERM may take before SIGKILL.
const STOP: Duration = Duration::from_secs(20);

impl Daemon {
    /// Starts the daemon under test with `args` and waits until it serves verdicts;
    /// `None` (a skip) when the probe cannot be loaded outside CI.
    pub fn start(args: &[&str]) -> Option<Self> {
        Self::start_with(args, DaemonSetup::default())
    }

    pub fn start_with(args: &[&str], setup: DaemonSetup<'_>) -> Option<Self> {
        match Self::launch(&trustdrift_bin(), args, setup) {
            Ok(daemon) => Some(daemon),
            Err(StartError::Unavailable(why)) => probe_unavailable(&why),
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts `bin run` with `args` after the ones every daemon under test has, and
    /// waits until it serves verdicts and its API says it is ready. An explicit empty
    /// configuration file unless `args` name one: /etc/trustdrift/config.toml, if this
    /// machine has one, must not change what is tested or measured.
    pub fn launch<S: AsRef<OsStr>>(
        bin: &Path,
        args: &[S],
        setup: DaemonSetup<'_>,
    ) -> Result<Self, StartError> {
        if !is_root() {
            return Err(StartError::Unavailable("not running as root".into()));
        }
        let failed = |what: &str, e: &dyn fmt::Display| StartError::Failed(format!("{what}: {e}"));
        let dir = TempDir::try_new("daemon").map_err(|e| failed("a directory", &e))?;
        let state = match setup.state_dir {
            Some(state) => state.to_path_buf(),
            None => {
                let state = dir.join("state");
                fs::create_dir(&state).map_err(|e| failed(&format!("{}", state.display()), &e))?;
                state
            }
        };
        let log = dir.join("daemon.log");
        let log_file =
            fs::File::create(&log).map_err(|e| failed(&format!("{}", log.display()), &e))?;
        let port = crate::try_free_port().map_err(|e| failed("a free port", &e))?;
        let mut listen = format!("127.0.0.1:{port}");
        if let Some(extra) = &setup.also_listen {
            listen = format!("{listen},{extra}");
        }
        let mut cmd = Command::new(bin);
        cmd.args(["--log", "info", "run", "--listen"])
            .arg(listen)
            .arg("--state-dir")
            .arg(&state)
            .arg("--pin-dir")
            .arg(setup.pin_dir.unwrap_or(Path::new("")));
        let has_config = args.iter().any(|a| {
            let a = a.as_ref().to_string_lossy();
            a == "--config" || a.starts_with("--config=")
        });
        if !has_config {
            let config = dir.join("config.toml");
            fs::write(&config, "").map_err(|e| failed(&format!("{}", config.display()), &e))?;
            cmd.arg("--config").arg(config);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRUSTDRIFT_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(setup.env);
        // SAFETY: prctl is async-signal-safe; it runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without its guards running (SIGKILL), so does the
                // daemon. (The signal comes when the thread that forked it ends: a test's
                // own thread.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| failed(&format!("starting {}", bin.display()), &e))?;
        let mut daemon = Self {
            child,
            port,
            log,
            exited: false,
            _dir: dir,
        };
        let deadline = Instant::now() + START;
        loop {
            interrupt::check_interrupt().map_err(|e| failed("waiting", &e))?;
            if daemon.log().contains("serving verdicts") {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                daemon.exited = true;
                return Err(StartError::Unavailable(format!(
                    "trustdrift run did not start: it exited before serving verdicts \
                     ({status}):\n{}",
                    daemon.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(StartError::Unavailable(format!(
                    "trustdrift run did not start: no verdicts served within {} s:\n{}",
                    START.as_secs(),
                    daemon.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The API listens right after the log line.
        let deadline = Instant::now() + READY;
        while daemon.api().get("/readyz").ok().map(|(s, _)| s) != Some(200) {
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "its API is not ready:\n{}",
                    daemon.log_tail(20)
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its API, with errors as values.
    pub fn api(&self) -> Api {
        Api { port: self.port }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines it logged.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Warnings and errors it logged.
    pub fn log_warnings(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }

    /// An error (with the log's tail) if it is no longer running.
    pub fn ensure_running(&mut self) -> Result<()> {
        if self.exited {
            bail!("the daemon is not running");
        }
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            bail!("the daemon exited ({status}):\n{}", self.log_tail(20));
        }
        Ok(())
    }

    /// GET `path` on the API: (status, JSON body, or the text if not JSON). Panics, with
    /// its log, when it does not answer.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self
            .api()
            .get(path)
            .unwrap_or_else(|e| panic!("{e:#}\ndaemon log:\n{}", self.log()));
        let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (status, body)
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

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.as_str().unwrap_or_default().to_owned()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGKILL, as a crash or an OOM kill: no chance to save or clean up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 20 s). An error if it did not exit
    /// cleanly.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.exited {
            return Ok(());
        }
        // Only a daemon still running: a reaped pid may belong to someone else.
        if self.child.try_wait()?.is_none() {
            self.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = true;
                if !status.success() {
                    bail!("the daemon exited with {status}:\n{}", self.log_tail(20));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.exited = true;
                bail!(Unstoppable);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A daemon that ignored SIGTERM (and was killed): a bug, which fails a test.
#[derive(Debug)]
struct Unstoppable;

impl fmt::Display for Unstoppable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the daemon ignored SIGTERM for {} s and was killed",
            STOP.as_secs()
        )
    }
}

impl std::error::Error for Unstoppable {}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            if e.is::<Unstoppable>() && !thread::panicking() {
                panic!("{e}");
            }
            eprintln!("stopping the daemon: {e:#}");
        }
    }
}

/// A daemon's HTTP API on its loopback port, with errors as values.
#[derive(Clone, Copy, Debug)]
pub struct Api {
    pub port: u16,
}

impl Api {
    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::try_http_get(self.port, path)
    }

    /// GET `path`, which must answer 200.
    pub fn get_ok(&self, path: &str) -> Result<String> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// `GET /processes`.
    pub fn processes(&self) -> Result<Vec<Value>> {
        let body = self.get_ok("/processes")?;
        let v: Value = serde_json::from_str(&body).context("GET /processes: not JSON")?;
        match v {
            Value::Array(a) => Ok(a),
            other => bail!("GET /processes: not an array: {other}"),
        }
    }

    /// `GET /processes/{pid}`; `None` on 404.
    pub fn process(&self, pid: u32) -> Result<Option<Value>> {
        let path = format!("/processes/{pid}");
        match self.get(&path)? {
            (404, _) => Ok(None),
            (200, body) => Ok(Some(
                serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))?,
            )),
            (status, body) => bail!("GET {path}: {status}: {body}"),
        }
    }
}

/// The fingerprints (`sha256`) in a list of certificates as the API renders them.
pub fn shas(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| c["sha256"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
