//! The soak's checks: every live reader's verdict and CA diff against what it really
//! read, and what exited readers read, while the daemon still lists them; a wrong one
//! told as the reader's story.

use super::*;

impl Soak<'_> {
    /// Every live reader's verdict and diff against what it read; what exited readers
    /// read. Nothing changes meanwhile: the churn waits.
    pub(super) fn check(&mut self) -> Result<()> {
        self.checks += 1;
        self.on_exits()?;
        // One wait per live reader: too many syscalls for every turn of the loop.
        for (pid, status) in self.fleet.casualties() {
            self.live.remove(&pid);
            self.failures.push(format!(
                "reader {pid} died unexpectedly (wait status {status})"
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.on_replies()?;
            if self.live.values().all(Reader::settled) {
                break;
            }
            if Instant::now() > deadline {
                let stuck: Vec<u32> = self
                    .live
                    .iter()
                    .filter(|(_, r)| !r.settled())
                    .map(|(p, _)| *p)
                    .collect();
                self.failures.push(format!(
                    "check {}: readers {stuck:?} did not report their reads within 10 s",
                    self.checks
                ));
                break;
            }
            harness::sleep(Duration::from_millis(10))?;
        }
        let deadline = Instant::now() + CONVERGE;
        loop {
            let listed = self.daemon.api().processes()?;
            let wrong = self.judge_live(&listed);
            if wrong.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                self.failures.push(format!(
                    "check {} at {:.1} min: {} of {} live readers wrong after {} s, e.g.\n  {}",
                    self.checks,
                    self.started.elapsed().as_secs_f64() / 60.0,
                    wrong.len(),
                    self.live.len(),
                    CONVERGE.as_secs(),
                    wrong[..wrong.len().min(3)].join("\n  ")
                ));
                break;
            }
            harness::sleep(Duration::from_millis(250))?;
        }
        let listed = self.daemon.api().processes()?;
        let wrong = self.judge_exited(&listed);
        if !wrong.is_empty() {
            self.failures.push(format!(
                "check {} at {:.1} min: {} exited readers attributed a version they did not \
                 read, e.g.\n  {}",
                self.checks,
                self.started.elapsed().as_secs_f64() / 60.0,
                wrong.len(),
                wrong[..wrong.len().min(3)].join("\n  ")
            ));
        }
        Ok(())
    }

    /// The listed entry of the process `pid` started at `started` (Unix seconds).
    fn entry(listed: &[Value], pid: u32, started: f64, exited: bool) -> Option<&Value> {
        listed.iter().find(|p| {
            p["pid"] == pid
                && p["exited_at"].is_null() != exited
                && p["start_time"]
                    .as_str()
                    .and_then(harness::parse_rfc3339)
                    .is_some_and(|t| (t - started).abs() < 2.0)
        })
    }

    fn judge_live(&self, listed: &[Value]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (pid, reader) in &self.live {
            // Told to exit: it may be gone already.
            if !self.fleet.is_alive(*pid) || reader.held.iter().all(Option::is_none) {
                continue;
            }
            let Some(p) = Self::entry(listed, *pid, reader.started, false) else {
                wrong.push(format!("{pid}: not listed as a live process"));
                continue;
            };
            if let Err(e) = self.judge_reader(reader, p) {
                wrong.push(format!(
                    "{pid} ({:?}): {e}\n{}",
                    reader.kind,
                    self.story(reader, p)
                ));
            }
        }
        wrong
    }

    fn judge_reader(&self, reader: &Reader, p: &Value) -> Result<(), String> {
        let files = p["files"].as_array().ok_or("no files")?;
        let mut any_stale = false;
        for (store, held) in reader.stores.iter().zip(&reader.held) {
            let Some(held) = held else { continue };
            let store = &self.stores[*store];
            let path = store.path.to_string_lossy();
            let f = files
                .iter()
                .find(|f| f["path"] == *path)
                .ok_or_else(|| format!("no entry for {path}"))?;
            let read = f["read_version"]["sha256"].as_str().unwrap_or("none");
            if read != held {
                return Err(format!("{path}: read_version {read}, but it read {held}"));
            }
            let read_v = self
                .by_sha
                .get(held)
                .ok_or_else(|| format!("{path}: it read bytes of no version ({held})"))?;
            let now = store.current.map(|v| &self.versions[v]);
            let fresh = now.is_some_and(|v| v.sha == *held);
            any_stale |= !fresh;
            let want = if fresh { "fresh" } else { "stale" };
            if f["verdict"] != want {
                return Err(format!(
                    "{path}: verdict {} (want {want}; disk {}, note {})",
                    f["verdict"],
                    now.map_or("absent", |v| v.sha.as_str()),
                    f["note"]
                ));
            }
            if let Some(now) = now
                && f["current_version"]["sha256"] != now.sha.as_str()
            {
                return Err(format!(
                    "{path}: current_version {}, disk {}",
                    f["current_version"]["sha256"], now.sha
                ));
            }
            let read_cas = &self.versions[*read_v].cas;
            let empty = BTreeSet::new();
            let now_cas = now.map_or(&empty, |v| &v.cas);
            let fps = |set: &mut dyn Iterator<Item = &usize>| -> BTreeSet<String> {
                set.map(|i| self.cas[*i].sha256.clone()).collect()
            };
            let missing = fps(&mut now_cas.difference(read_cas));
            let removed = fps(&mut read_cas.difference(now_cas));
            let (got_missing, got_removed) =
                (shas(&f["missing_cas"]), shas(&f["removed_cas_trusted"]));
            if got_missing != missing || got_removed != removed {
                return Err(format!(
                    "{path}: missing {} / removed {} CAs, want {} / {}",
                    got_missing.len(),
                    got_removed.len(),
                    missing.len(),
                    removed.len()
                ));
            }
        }
        let want = if any_stale { "stale" } else { "fresh" };
        if p["verdict"] != want {
            return Err(format!("process verdict {} (want {want})", p["verdict"]));
        }
        Ok(())
    }

    /// What the reader did, what happened to its stores meanwhile, and what the daemon
    /// says of it, times in seconds since it started: enough to tell a daemon's mistake
    /// from the soak's.
    fn story(&self, reader: &Reader, p: &Value) -> String {
        let t = |at: f64| format!("{:+.3}s", at - reader.started);
        let mut lines: Vec<(f64, String)> = reader
            .log
            .iter()
            .map(|(at, i, what)| {
                let store = i.map_or(String::new(), |i| format!(" bundle-{}", reader.stores[i]));
                (*at, format!("    {} reader{store}: {what}", t(*at)))
            })
            .collect();
        let last = reader.log.last().map_or(reader.started, |l| l.0);
        for s in &reader.stores {
            for (at, what) in &self.stores[*s].log {
                if *at >= reader.started - 5.0 && *at <= last + 5.0 {
                    lines.push((*at, format!("    {} bundle-{s}: {what}", t(*at))));
                }
            }
        }
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
        let stamp = |v: &Value| {
            v.as_str()
                .and_then(harness::parse_rfc3339)
                .map_or("-".into(), t)
        };
        for f in p["files"].as_array().into_iter().flatten() {
            out.push(format!(
                "    daemon: {} {} opens {} reads {}, first_open {} last_open {} last_read {} \
                 read_at {}, read_version {} (since {}), current {}, exited_at {}",
                f["path"]
                    .as_str()
                    .unwrap_or("?")
                    .rsplit('/')
                    .next()
                    .unwrap_or("?"),
                f["verdict"],
                f["opens"],
                f["reads"],
                stamp(&f["first_open"]),
                stamp(&f["last_open"]),
                stamp(&f["last_read"]),
                stamp(&f["read_at"]),
                f["read_version"]["sha256"]
                    .as_str()
                    .map_or("none".into(), short),
                stamp(&f["read_version"]["since"]),
                f["current_version"]["sha256"]
                    .as_str()
                    .map_or("none".into(), short),
                stamp(&p["exited_at"]),
            ));
        }
        out.join("\n")
    }

    fn judge_exited(&mut self, listed: &[Value]) -> Vec<String> {
        let mut wrong = Vec::new();
        for (pid, reader, _) in &self.exited {
            let Some(p) = Self::entry(listed, *pid, reader.started, true) else {
                continue;
            };
            let files = p["files"].as_array().cloned().unwrap_or_default();
            for (store, held) in reader.stores.iter().zip(&reader.held) {
                let Some(held) = held else { continue };
                let path = self.stores[*store].path.to_string_lossy();
                let read = files
                    .iter()
                    .find(|f| f["path"] == *path)
                    .and_then(|f| f["read_version"]["sha256"].as_str().map(str::to_owned));
                self.attributed += 1;
                if read.as_deref() != Some(held.as_str()) {
                    wrong.push(format!(
                        "{pid} ({:?}) {path}: read_version {}, but it read {}\n{}",
                        reader.kind,
                        read.as_deref().map_or("none".into(), short),
                        short(held),
                        self.story(reader, p)
                    ));
                }
            }
        }
        wrong
    }
}
