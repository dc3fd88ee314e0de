//! A `trustdrift run` under test: its own loopback port, state directory and (empty)
//! configuration file, no pinning, stopped with SIGTERM when dropped; and what it says
//! over HTTP.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::TempDir;

pub struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
    exited: bool,
    _dir: TempDir,
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl Daemon {
    /// Starts `trustdrift run` with `args` after the ones every benchmark daemon has, and
    /// waits until it serves verdicts.
    pub fn start(bin: &Path, args: &[String]) -> Result<Self> {
        let dir = TempDir::new("daemon")?;
        let state = dir.join("state");
        fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        // An explicit empty file: /etc/trustdrift/config.toml, if this machine has one,
        // must not change what is measured; nor may TRUSTDRIFT_* variables.
        let config = dir.join("config.toml");
        fs::write(&config, "").with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("daemon.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--log", "info", "run", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(&state)
            .args(["--pin-dir", ""])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRUSTDRIFT_") {
                cmd.env_remove(key);
            }
        }
        // SAFETY: prctl is async-signal-safe; it runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without its guards running (SIGKILL), so does the
                // daemon.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut daemon = Self {
            child,
            port,
            log,
            exited: false,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            crate::check_interrupt()?;
            if daemon.log_text().contains("serving verdicts") {
                break;
            }
            if let Some(status) = daemon.child.try_wait()? {
                daemon.exited = true;
                bail!(
                    "the daemon exited before serving verdicts ({status}):\n{}",
                    daemon.log_tail(20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not serve verdicts within 60 s:\n{}",
                    daemon.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The API listens right after the log line.
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon.get("/readyz").ok().map(|(s, _)| s) != Some(200) {
            if Instant::now() > deadline {
                bail!("the daemon's API is not ready:\n{}", daemon.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines the daemon logged.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Warnings and errors the daemon logged.
    pub fn log_warnings(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }

    /// An error (with the log's tail) if the daemon is no longer running.
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

    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.port, path)
    }

    /// GET `path`, which must answer 200.
    pub fn get_ok(&self, path: &str) -> Result<String> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    pub fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.get_ok("/metrics")?))
    }

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

    /// SIGTERM, then waits for the exit (SIGKILL after 20 s). An error if it did not exit
    /// cleanly.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.exited {
            return Ok(());
        }
        if self.child.try_wait()?.is_none() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(20);
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
                bail!("the daemon ignored SIGTERM for 20 s and was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("xtask: stopping the daemon: {e:#}");
        }
    }
}

/// A minimal HTTP/1.1 GET on loopback (the API answers with a Content-Length and closes
/// when asked).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("GET {path}: sending"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("GET {path}: reading the answer"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `/metrics`, parsed.
#[derive(Clone, Debug, Default)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(parse_sample).collect())
    }

    /// Samples of `name` carrying every label of `matching`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        matching: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0
            .iter()
            .filter(move |s| s.name == name && matching.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// Sum of the samples of `name` carrying every label of `matching` (0 if none: a
    /// family with nothing to count has no series).
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> f64 {
        self.samples(name, matching).map(|s| s.value).sum()
    }

    /// `trustdrift_events_lost_total` by reason.
    pub fn lost(&self) -> BTreeMap<String, u64> {
        self.samples("trustdrift_events_lost_total", &[])
            .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value as u64)))
            .collect()
    }

    pub fn lost_total(&self) -> u64 {
        self.lost().values().sum()
    }

    /// `trustdrift_events_total{kind}`.
    pub fn events(&self, kind: &str) -> u64 {
        self.sum("trustdrift_events_total", &[("kind", kind)]) as u64
    }

    /// `trustdrift_tracked{what}`.
    pub fn tracked(&self, what: &str) -> u64 {
        self.sum("trustdrift_tracked", &[("what", what)]) as u64
    }
}

/// Per-reason growth of a loss counter between two scrapes; only reasons that grew.
pub fn lost_between(before: &Metrics, after: &Metrics) -> BTreeMap<String, u64> {
    let b = before.lost();
    after
        .lost()
        .into_iter()
        .map(|(reason, n)| {
            let was = b.get(&reason).copied().unwrap_or(0);
            (reason, n.saturating_sub(was))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` → the labels and `rest`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &after_key[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_escaped_labels() {
        let m = Metrics::parse(
            "# HELP x\n\
             trustdrift_events_total{kind=\"access\"} 12\n\
             trustdrift_stale_processes{kind=\"ca\",comm=\"a \\\"b\\\",c\"} 2\n\
             trustdrift_ready 1\n",
        );
        assert_eq!(m.events("access"), 12);
        let stale: Vec<&Sample> = m.samples("trustdrift_stale_processes", &[]).collect();
        assert_eq!(stale[0].label("comm"), Some("a \"b\",c"));
        assert_eq!(stale[0].value, 2.0);
        assert_eq!(m.sum("trustdrift_ready", &[]), 1.0);
    }
}
