//! `cargo xtask soak`: one daemon under ten minutes of churn (outside CI). Readers start
//! all the time (most short-lived, some living a minute and re-reading now and then, a
//! few exec'ing `openssl dgst`), each reading one or two of a few CA bundles and reporting
//! the SHA-256 of exactly the bytes it read; the bundles change every few seconds (new
//! versions adding and removing CAs, removals, re-creations, move-aside-and-replace,
//! touches, identical rewrites). Every 30 s the churn pauses for a check: the daemon's
//! memory, and every live reader's verdict and CA diff against what it really read (and
//! what exited readers read, while the daemon still lists them). At the end: memory
//! flat after warm-up, every verdict right, no loss unaccounted, the daemon answering.
//! Any failure makes the command exit non-zero.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap},
    ffi::CString,
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use trustdrift_testkit::{Cert, Daemon, DaemonSetup, TempDir, try_replace_atomically};

mod check;

use crate::harness::{
    self, Metrics, Rng, Scrape,
    fleet::{Fleet, hex, sha256_hex},
    lost_between,
    procstat::{self, CpuMeter, Memory},
};

/// CAs the store versions are made of.
const POOL: usize = 8;
const SHORT: &std::ffi::CStr = c"td-soak-short";
const LONG: &std::ffi::CStr = c"td-soak-long";
/// How long a check waits for the daemon to agree (a re-read of a fresh process is
/// noticed within 8 poll intervals, 2 s by default).
const CONVERGE: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// How long the churn lasts.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// RSS at the first sample after this is what growth is measured from (at most half
    /// the run).
    #[arg(long, default_value_t = 2.0)]
    warmup_minutes: f64,
    /// Growth of RSS's floor (lowest in the last third after warm-up over lowest in the
    /// first third) that still counts as flat, in %.
    #[arg(long, default_value_t = 10.0)]
    max_growth: f64,
    /// Seconds between samples and checks.
    #[arg(long, default_value_t = 30)]
    sample_seconds: u64,
    /// CA bundles the readers pick from.
    #[arg(long, default_value_t = 4)]
    stores: usize,
    /// New readers per second (Poisson arrivals).
    #[arg(long, default_value_t = 10.0)]
    spawn_rate: f64,
    /// Mean seconds between store changes (one store changes each time).
    #[arg(long, default_value_t = 3.0)]
    change_seconds: f64,
    /// The daemon's `ledger.exit_grace`: exited readers stay in its memory this long, so
    /// a shorter one than the default 5 min reaches the steady state within warm-up.
    #[arg(long, default_value = "30s")]
    exit_grace: String,
    /// Seed of every random choice (printed; for a repeat).
    #[arg(long)]
    seed: Option<u64>,
    /// Also follow the built-in trust paths, as a production daemon does. Whatever else
    /// this machine runs then counts too: its losses cannot be told from the soak's, and
    /// its processes weigh on memory.
    #[arg(long)]
    default_paths: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Forked; reads once, exits within 2 s.
    Short,
    /// Forked; lives 10-60 s, re-reading every 2-15 s.
    Long,
    /// `openssl dgst -sha256 FILE`: exec'd, exits at once.
    Exec,
}

struct Reader {
    kind: Kind,
    /// Indexes into the stores, in the order it reads them.
    stores: Vec<usize>,
    /// Per store: the SHA-256 of what it last read successfully (a failed re-read keeps
    /// what it had, as a process whose reload fails does).
    held: Vec<Option<String>>,
    /// Per store: the last read reported (seq).
    replied: Vec<Option<u32>>,
    /// Reads asked for so far (0: the first).
    asked: u32,
    /// Unix seconds when it was started, to tell it from another process with its pid.
    started: f64,
    /// What happened to it, for the story of a wrong verdict: (Unix seconds, store
    /// index or `None` for the whole reader, event).
    log: Vec<(f64, Option<usize>, String)>,
}

impl Reader {
    fn settled(&self) -> bool {
        self.replied.iter().all(|r| *r == Some(self.asked))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    Reread(u32),
    Dismiss(u32),
}

struct Store {
    path: PathBuf,
    cpath: CString,
    /// Index into the versions; `None` while the file is absent.
    current: Option<usize>,
    /// (Unix seconds, change) for the story of a wrong verdict.
    log: Vec<(f64, String)>,
}

struct Version {
    sha: String,
    cas: BTreeSet<usize>,
}

#[derive(Clone, Copy, Debug)]
enum Change {
    Replace,
    MoveAsideAndReplace,
    Remove,
    Recreate,
    Touch,
    IdenticalRewrite,
}

struct SampleRow {
    at: Duration,
    memory: Memory,
    cpu_share: f64,
    tracked: BTreeMap<&'static str, u64>,
    live_readers: usize,
}

struct Soak<'a> {
    args: &'a Args,
    daemon: Daemon,
    fleet: Fleet,
    cas: Vec<Cert>,
    stores: Vec<Store>,
    versions: Vec<Version>,
    by_sha: HashMap<String, usize>,
    /// Forked readers alive, by pid.
    live: BTreeMap<u32, Reader>,
    /// Readers that exited, with what they read, kept while the daemon may list them.
    exited: Vec<(u32, Reader, Instant)>,
    execs: Vec<(Child, Reader)>,
    queue: BinaryHeap<Reverse<(Instant, Action)>>,
    rng: Rng,
    started: Instant,
    exit_grace: Duration,
    counts: BTreeMap<String, u64>,
    samples: Vec<SampleRow>,
    cpu: CpuMeter,
    failures: Vec<String>,
    checks: usize,
    attributed: usize,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--exit-grace {s:?}: not a number of s, m or h"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("--exit-grace {s:?}: the unit must be s, m or h"),
    }))
}

/// The head of a SHA-256, enough to tell versions apart in a story.
fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

fn shas(list: &Value) -> BTreeSet<String> {
    trustdrift_testkit::shas(list).into_iter().collect()
}

impl Soak<'_> {
    fn count(&mut self, what: impl Into<String>) {
        *self.counts.entry(what.into()).or_default() += 1;
    }

    fn version_of(&mut self, cas: BTreeSet<usize>) -> usize {
        let sha = sha256_hex(harness::bundle(&self.cas, &cas).as_bytes());
        if let Some(i) = self.by_sha.get(&sha) {
            return *i;
        }
        self.versions.push(Version {
            sha: sha.clone(),
            cas,
        });
        self.by_sha.insert(sha, self.versions.len() - 1);
        self.versions.len() - 1
    }

    /// 2 to 5 CAs of the pool, not the set `not`.
    fn new_version(&mut self, not: Option<usize>) -> usize {
        loop {
            let size = 2 + self.rng.below(4);
            let mut set = BTreeSet::new();
            while set.len() < size {
                set.insert(self.rng.below(POOL));
            }
            let v = self.version_of(set);
            if Some(v) != not {
                return v;
            }
        }
    }

    fn write_version(&self, store: usize, v: usize) -> Result<()> {
        let content = harness::bundle(&self.cas, &self.versions[v].cas);
        Ok(try_replace_atomically(&self.stores[store].path, &content)?)
    }

    fn change_store(&mut self) -> Result<()> {
        let s = self.rng.below(self.stores.len());
        let absent = self.stores.iter().filter(|s| s.current.is_none()).count();
        let change = match self.stores[s].current {
            None => Change::Recreate,
            Some(_) => match self.rng.below(100) {
                0..55 => Change::Replace,
                55..70 => Change::MoveAsideAndReplace,
                70..80 if absent == 0 => Change::Remove,
                70..90 => Change::Touch,
                _ => Change::IdenticalRewrite,
            },
        };
        let path = self.stores[s].path.clone();
        let current = self.stores[s].current;
        match change {
            Change::Replace | Change::Recreate => {
                let v = self.new_version(current);
                self.write_version(s, v)?;
                self.stores[s].current = Some(v);
            }
            Change::MoveAsideAndReplace => {
                let aside = path.with_extension("pem.old");
                fs::rename(&path, &aside)
                    .with_context(|| format!("moving {} aside", path.display()))?;
                self.stores[s].current = None;
                harness::sleep(Duration::from_millis(20))?;
                let v = self.new_version(current);
                self.write_version(s, v)?;
                self.stores[s].current = Some(v);
                fs::remove_file(&aside).with_context(|| format!("removing {}", aside.display()))?;
            }
            Change::Remove => {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                self.stores[s].current = None;
            }
            Change::Touch => {
                let f = fs::File::options()
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                f.set_modified(SystemTime::now())
                    .with_context(|| format!("touching {}", path.display()))?;
            }
            Change::IdenticalRewrite => {
                if let Some(v) = current {
                    self.write_version(s, v)?;
                }
            }
        }
        self.count(format!("store change: {change:?}"));
        let now = self.stores[s]
            .current
            .map_or("absent".into(), |v| short(&self.versions[v].sha));
        self.stores[s]
            .log
            .push((unix_now(), format!("{change:?}, now {now}")));
        Ok(())
    }

    fn spawn_reader(&mut self) -> Result<()> {
        let kind = match self.rng.below(100) {
            0..55 => Kind::Short,
            55..90 => Kind::Long,
            _ => Kind::Exec,
        };
        let first = self.rng.below(self.stores.len());
        let mut stores = vec![first];
        if kind != Kind::Exec && self.stores.len() > 1 && self.rng.below(5) == 0 {
            stores.push((first + 1 + self.rng.below(self.stores.len() - 1)) % self.stores.len());
        }
        let reader = Reader {
            kind,
            held: vec![None; stores.len()],
            replied: vec![None; stores.len()],
            stores,
            asked: 0,
            started: unix_now(),
            log: Vec::new(),
        };
        self.count(format!("readers started: {kind:?}"));
        if kind == Kind::Exec {
            let child = Command::new("openssl")
                .args(["dgst", "-sha256", "-r"])
                .arg(&self.stores[reader.stores[0]].path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting openssl dgst")?;
            self.execs.push((child, reader));
            return Ok(());
        }
        let paths: Vec<CString> = reader
            .stores
            .iter()
            .map(|s| self.stores[*s].cpath.clone())
            .collect();
        let name = if kind == Kind::Long { LONG } else { SHORT };
        let pid = self.fleet.spawn(name, &paths)?;
        let now = Instant::now();
        let lifetime = match kind {
            Kind::Long => self
                .rng
                .between(Duration::from_secs(10), Duration::from_secs(60)),
            _ => self.rng.between(Duration::ZERO, Duration::from_secs(2)),
        };
        self.queue
            .push(Reverse((now + lifetime, Action::Dismiss(pid))));
        if kind == Kind::Long {
            let next = self
                .rng
                .between(Duration::from_secs(2), Duration::from_secs(15));
            self.queue.push(Reverse((now + next, Action::Reread(pid))));
        }
        self.live.insert(pid, reader);
        Ok(())
    }

    fn on_replies(&mut self) -> Result<()> {
        for r in self.fleet.replies()? {
            let Some(reader) = self.live.get_mut(&r.pid).or_else(|| {
                self.exited
                    .iter_mut()
                    .find(|(pid, _, _)| *pid == r.pid)
                    .map(|(_, reader, _)| reader)
            }) else {
                continue;
            };
            let i = r.index as usize;
            if i >= reader.held.len() {
                continue;
            }
            let what = match &r.outcome {
                Ok(sha) => format!("read #{} {}", r.seq, short(&hex(sha))),
                Err(errno) => format!("read #{} failed, errno {errno}", r.seq),
            };
            reader.log.push((unix_now(), Some(i), what));
            match r.outcome {
                Ok(sha) => reader.held[i] = Some(hex(&sha)),
                Err(errno) if errno == libc::ENOENT => {}
                Err(errno) => self.failures.push(format!(
                    "reader {} could not read {}: errno {errno}",
                    r.pid,
                    self.stores[reader.stores[i]].path.display()
                )),
            }
            reader.replied[i] = Some(r.seq);
        }
        Ok(())
    }

    fn on_exits(&mut self) -> Result<()> {
        let now = Instant::now();
        for pid in self.fleet.reap() {
            if let Some(reader) = self.live.remove(&pid) {
                self.exited.push((pid, reader, now));
            }
        }
        let mut i = 0;
        while i < self.execs.len() {
            if self.execs[i].0.try_wait()?.is_none() {
                i += 1;
                continue;
            }
            let (mut child, mut reader) = self.execs.swap_remove(i);
            let mut out = String::new();
            if let Some(mut stdout) = child.stdout.take() {
                stdout.read_to_string(&mut out).ok();
            }
            // "<hex> *<path>"; nothing when the file was absent.
            if let Some(sha) = out.split_whitespace().next().filter(|s| s.len() == 64) {
                reader.held[0] = Some(sha.to_owned());
            }
            self.exited.push((child.id(), reader, now));
        }
        // Gone from the daemon's listing after the exit grace: nothing left to check.
        let keep = self.exit_grace + Duration::from_secs(10);
        self.exited.retain(|(_, _, at)| at.elapsed() < keep);
        Ok(())
    }

    fn run_due(&mut self) -> Result<()> {
        let now = Instant::now();
        while let Some(Reverse((at, action))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            match action {
                Action::Reread(pid) => {
                    let Some(reader) = self.live.get_mut(&pid) else {
                        continue;
                    };
                    reader.asked += 1;
                    reader.log.push((
                        unix_now(),
                        None,
                        format!("asked to re-read (#{})", reader.asked),
                    ));
                    self.fleet.reread(pid)?;
                    self.count("re-reads");
                    let next = self
                        .rng
                        .between(Duration::from_secs(2), Duration::from_secs(15));
                    self.queue.push(Reverse((now + next, Action::Reread(pid))));
                }
                Action::Dismiss(pid) => {
                    if let Some(reader) = self.live.get_mut(&pid) {
                        reader.log.push((unix_now(), None, "told to exit".into()));
                        self.fleet.dismiss(pid)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn sample(&mut self) -> Result<()> {
        self.daemon.ensure_running()?;
        let pid = self.daemon.pid();
        let memory = procstat::memory(pid)?;
        let cpu_share = self.cpu.share()?;
        self.cpu = CpuMeter::start(pid)?;
        let m = self.daemon.scrape()?;
        let mut tracked = BTreeMap::new();
        for what in ["processes", "files", "watches", "contents_cached"] {
            tracked.insert(what, m.tracked(what));
        }
        tracked.insert(
            "kernel accesses",
            m.sum("trustdrift_bpf_map_entries", &[("map", "accesses")]) as u64,
        );
        let row = SampleRow {
            at: self.started.elapsed(),
            memory,
            cpu_share,
            tracked,
            live_readers: self.live.len(),
        };
        eprintln!(
            "xtask: soak {:>5.1} min: RSS {:.1} MiB (anon {:.1}, peak {:.1}), CPU {:.1}%, \
             {} live readers, tracked {:?}",
            row.at.as_secs_f64() / 60.0,
            row.memory.rss_mib(),
            row.memory.anon_mib(),
            row.memory.hwm_mib(),
            100.0 * row.cpu_share,
            row.live_readers,
            row.tracked
        );
        self.samples.push(row);
        Ok(())
    }
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    harness::raise_fd_limit();
    if args.stores == 0 || args.spawn_rate <= 0.0 || args.change_seconds <= 0.0 {
        bail!("--stores, --spawn-rate and --change-seconds must be positive");
    }
    let exit_grace = parse_duration(&args.exit_grace)?;
    let seed = args.seed.unwrap_or_else(harness::random_u64);
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let warmup = Duration::from_secs_f64(args.warmup_minutes * 60.0).min(duration / 2);
    let dir = TempDir::try_new("soak")?;
    let store_dir = dir.join("stores");
    fs::create_dir_all(&store_dir).context("creating the store dir")?;
    eprintln!(
        "xtask: soak for {:.1} min, seed {seed}, {} stores, {} readers/s, a change every \
         ~{} s, exit grace {}, {}",
        args.minutes,
        args.stores,
        args.spawn_rate,
        args.change_seconds,
        args.exit_grace,
        if args.default_paths {
            "built-in trust paths too"
        } else {
            "only the soak's stores followed"
        }
    );
    let cas = harness::cas("Soak", POOL);
    let mut stores = Vec::new();
    for i in 0..args.stores {
        let path = store_dir.join(format!("bundle-{i}.pem"));
        stores.push(Store {
            cpath: CString::new(path.as_os_str().as_encoded_bytes())?,
            path,
            current: None,
            log: Vec::new(),
        });
    }
    let mut daemon_args = vec![
        "--prefix".into(),
        format!("{}/", store_dir.display()),
        "--set".into(),
        format!("ledger.exit_grace={}", args.exit_grace),
    ];
    if !args.default_paths {
        daemon_args.push("--no-default-paths".into());
    }
    let daemon = Daemon::launch(trustdrift, &daemon_args, DaemonSetup::default())?;
    let cpu = CpuMeter::start(daemon.pid())?;
    let mut soak = Soak {
        args,
        daemon,
        fleet: Fleet::new()?,
        cas,
        stores,
        versions: Vec::new(),
        by_sha: HashMap::new(),
        live: BTreeMap::new(),
        exited: Vec::new(),
        execs: Vec::new(),
        queue: BinaryHeap::new(),
        rng: Rng::new(seed),
        started: Instant::now(),
        exit_grace,
        counts: BTreeMap::new(),
        samples: Vec::new(),
        cpu,
        failures: Vec::new(),
        checks: 0,
        attributed: 0,
    };
    for s in 0..soak.stores.len() {
        let v = soak.new_version(None);
        soak.write_version(s, v)?;
        soak.stores[s].current = Some(v);
    }
    let start_metrics = soak.daemon.scrape()?;
    let outcome = churn(&mut soak, duration);
    // Whatever happened, the readers go before the verdict on the run.
    let end_metrics = soak.daemon.scrape();
    let healthy = soak.daemon.api().get("/healthz").map(|(s, _)| s == 200);
    let ready = soak.daemon.api().get("/readyz").map(|(s, _)| s == 200);
    outcome?;
    let end_metrics = end_metrics?;
    report(
        &mut soak,
        &start_metrics,
        &end_metrics,
        warmup,
        healthy?,
        ready?,
        seed,
    )
}

fn churn(soak: &mut Soak, duration: Duration) -> Result<()> {
    let sample_every = Duration::from_secs(soak.args.sample_seconds.max(1));
    let mut next_spawn = Instant::now();
    let mut next_change = Instant::now() + Duration::from_secs_f64(soak.args.change_seconds);
    let mut next_sample = Instant::now() + sample_every;
    soak.sample()?;
    loop {
        harness::check_interrupt()?;
        soak.daemon.ensure_running()?;
        let now = Instant::now();
        if now >= soak.started + duration {
            break;
        }
        soak.on_replies()?;
        soak.on_exits()?;
        soak.run_due()?;
        if now >= next_spawn {
            soak.spawn_reader()?;
            // Exponential gaps: arrivals bunch up now and then, as they do.
            let gap = -(1.0 - soak.rng.unit()).ln() / soak.args.spawn_rate;
            next_spawn += Duration::from_secs_f64(gap);
        }
        if now >= next_change {
            soak.change_store()?;
            let gap = soak.args.change_seconds * (0.5 + soak.rng.unit());
            next_change = Instant::now() + Duration::from_secs_f64(gap);
        }
        if now >= next_sample {
            soak.sample()?;
            soak.check()?;
            next_sample = Instant::now() + sample_every;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The last word: a sample and a check with the churn stopped.
    soak.on_replies()?;
    soak.on_exits()?;
    soak.sample()?;
    soak.check()
}

fn report(
    soak: &mut Soak,
    start: &Metrics,
    end: &Metrics,
    warmup: Duration,
    healthy: bool,
    ready: bool,
    seed: u64,
) -> Result<()> {
    let mut problems = std::mem::take(&mut soak.failures);
    println!(
        "soak: {:.1} min, seed {seed}, {}",
        soak.started.elapsed().as_secs_f64() / 60.0,
        harness::machine()
    );
    for (what, n) in &soak.counts {
        println!("  {what}: {n}");
    }
    println!(
        "  verdict checks: {} (every {} s), exited readers' reads checked: {}",
        soak.checks, soak.args.sample_seconds, soak.attributed
    );
    println!("  RSS every {} s (MiB):", soak.args.sample_seconds);
    for s in &soak.samples {
        println!(
            "    {:>5.1} min  RSS {:6.1}  anon {:6.1}  peak {:6.1}  CPU {:5.1}%  live readers {:4}  {:?}",
            s.at.as_secs_f64() / 60.0,
            s.memory.rss_mib(),
            s.memory.anon_mib(),
            s.memory.hwm_mib(),
            100.0 * s.cpu_share,
            s.live_readers,
            s.tracked
        );
    }
    let reference = soak.samples.iter().find(|s| s.at >= warmup);
    match (reference, soak.samples.last()) {
        (Some(r), Some(last)) if last.at > r.at => {
            // RSS swings by a few MiB as the allocator takes and returns memory; a leak
            // raises its floor. So the lowest RSS of the last third of the run after
            // warm-up is compared with the lowest of the first third.
            let after: Vec<&SampleRow> = soak.samples.iter().filter(|s| s.at >= r.at).collect();
            let third = (after.len() / 3).max(1);
            let floor =
                |rows: &[&SampleRow]| rows.iter().map(|s| s.memory.rss_kib).min().unwrap_or(0);
            let (early, late) = (floor(&after[..third]), floor(&after[after.len() - third..]));
            let growth = 100.0 * (late as f64 / early.max(1) as f64 - 1.0);
            let max_after = after.iter().map(|s| s.memory.rss_kib).max().unwrap_or(0);
            let flat = growth <= soak.args.max_growth;
            println!(
                "  memory: lowest RSS {:.1} MiB in the first third after warm-up ({:.1} min), \
                 {:.1} MiB in the last third: {growth:+.1}% (flat: at most +{}%): {}; \
                 highest after warm-up {:.1} MiB, at the end {:.1} MiB",
                early as f64 / 1024.0,
                r.at.as_secs_f64() / 60.0,
                late as f64 / 1024.0,
                soak.args.max_growth,
                if flat { "flat" } else { "NOT flat" },
                max_after as f64 / 1024.0,
                last.memory.rss_mib(),
            );
            if !flat {
                problems.push(format!(
                    "RSS grew {growth:+.1}% after warm-up (limit +{}%)",
                    soak.args.max_growth
                ));
            }
            // RSS only moves once the heap's free space is used up, and the daemon keeps
            // what it freed after loading the probe: its own counts of what it holds show
            // growth RSS hides. Informational: they are bounded by configuration.
            for (what, at_ref) in &r.tracked {
                let at_end = last.tracked.get(what).copied().unwrap_or(0);
                let steady = after
                    .windows(2)
                    .all(|w| w[1].tracked.get(what) >= w[0].tracked.get(what));
                println!(
                    "  {what}: {at_ref} after warm-up, {at_end} at the end{}",
                    if steady && at_end > *at_ref {
                        " (grew at every sample)"
                    } else {
                        ""
                    }
                );
            }
        }
        _ => problems.push("too few samples after warm-up to judge memory".into()),
    }
    let lost = lost_between(start, end);
    let content_changes: u64 = soak
        .counts
        .iter()
        .filter(|(k, _)| k.contains("Replace") || k.contains("Recreate") || k.contains("Remove"))
        .map(|(_, n)| *n)
        .sum();
    let mut accounted = Vec::new();
    for (reason, n) in &lost {
        // The catalog keeps 16 versions per file: older ones go, and are counted, as the
        // stores change; never more than one per change.
        if reason == "catalog_versions_dropped" && *n <= content_changes {
            accounted.push(format!(
                "{reason} {n} (history beyond 16 versions per store, {content_changes} content changes)"
            ));
        } else {
            problems.push(format!("lost: {reason} {n}"));
        }
    }
    println!(
        "  losses: {}",
        if lost.is_empty() {
            "none".to_owned()
        } else {
            format!("{lost:?}; accounted: {accounted:?}")
        }
    );
    let scan_errors: BTreeMap<String, u64> = end
        .samples("trustdrift_scan_errors_total", &[])
        .filter(|s| s.value > 0.0)
        .filter_map(|s| Some((s.label("reason")?.to_owned(), s.value as u64)))
        .collect();
    println!("  scan errors (informational): {scan_errors:?}");
    let warnings = soak.daemon.log_warnings();
    println!("  daemon warnings logged: {}", warnings.len());
    for w in warnings.iter().take(5) {
        println!("    {w}");
    }
    println!("  daemon answering at the end: /healthz {healthy}, /readyz {ready}");
    if !healthy || !ready {
        problems.push("the daemon did not answer /healthz and /readyz with 200 at the end".into());
    }
    if problems.is_empty() {
        println!("soak: passed");
        Ok(())
    } else {
        for p in &problems {
            println!("  FAILED: {p}");
        }
        bail!("soak failed: {} problem(s)", problems.len())
    }
}
