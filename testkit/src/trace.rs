//! `trustdrift trace --json` under test, its records collected as they arrive.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Guarded, is_root, probe_unavailable, trustdrift_bin};

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
        if !is_root() {
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
