//! `cargo xtask bench throughput`: storms of short-lived processes, each opening and
//! reading a few trust files once and exiting, at increasing rates and then as fast as
//! the CPUs can fork them. Every open of a storm process is a new (process, path) pair,
//! so each is a record the probe must deliver; /metrics says how many arrived and how
//! many were lost, by reason, and what is neither is reported as unaccounted.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use trustdrift_testkit::{Daemon, DaemonSetup, TempDir};

use super::{median, verdict, write_section};
use crate::harness::{
    self, Metrics, Scrape, lost_between,
    procstat::CpuMeter,
    storm::{Outcome, Plan, Storm},
};

/// The kernel's default `probe.max_accesses` and the ledger's default exit grace: what
/// bounds a storm the daemon can take for long with its defaults.
const DEFAULT_MAX_ACCESSES: u64 = 32_768;
const DEFAULT_EXIT_GRACE_S: u64 = 300;

#[derive(clap::Args)]
pub struct Args {
    /// Paced steps, in matched opens per second (storm processes/s x --files).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,3000,5000,7500,10000,20000"
    )]
    rates: Vec<u64>,
    /// Trust files each storm process opens and reads in the paced steps.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Trust files per process of the full-speed steps (each also measured without the
    /// daemon, for what the daemon costs the storm).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    max_files: Vec<usize>,
    /// Seconds per step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// At most this many storm processes per step, so that a step's pairs fit the tables
    /// sized for it.
    #[arg(long, default_value_t = 50_000)]
    max_processes: u64,
    /// Rounds; every step runs once per round, with a fresh daemon; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Forking processes (default: one per CPU).
    #[arg(long)]
    drivers: Option<usize>,
    /// Rate (matched opens/s) of the run with default capacities, which finds whether
    /// (and when) the kernel's access table fills.
    #[arg(long, default_value_t = 2000)]
    capacity_rate: u64,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Paced { opens_per_s: u64 },
    Max { daemon: bool },
}

#[derive(Clone, Copy, Debug)]
struct Step {
    kind: Kind,
    files: usize,
}

impl Step {
    fn name(&self) -> String {
        match self.kind {
            Kind::Paced { opens_per_s } => format!("paced {opens_per_s} opens/s"),
            Kind::Max { daemon: true } => "full speed".into(),
            Kind::Max { daemon: false } => "full speed, no daemon".into(),
        }
    }
}

/// One run of one step.
#[derive(Clone, Debug, Default)]
struct Run {
    storm: Outcome,
    /// Records the storm made: an access per (process, path), an exit per process.
    expected: u64,
    delivered: u64,
    /// Of which accesses (the matched opens).
    accesses: u64,
    lost: BTreeMap<String, u64>,
    /// From the storm's end until every record was delivered or counted lost.
    catch_up: Duration,
    /// The daemon's CPU seconds over the storm and its catch-up.
    daemon_cpu: f64,
    /// Neither delivered nor counted lost when the counts stopped moving.
    unaccounted: u64,
}

impl Run {
    fn lost_total(&self) -> u64 {
        self.lost.values().sum()
    }

    fn storm_opens_per_s(&self, files: usize) -> f64 {
        self.storm.processes_per_second() * files as f64
    }

    /// Accesses delivered per second, over the storm and the catch-up.
    fn delivered_opens_per_s(&self) -> f64 {
        self.accesses as f64 / (self.storm.elapsed + self.catch_up).as_secs_f64().max(1e-9)
    }
}

struct Setup<'a> {
    bin: &'a Path,
    prefix: String,
    paths: Vec<CString>,
    drivers: usize,
    args: &'a Args,
}

impl Setup<'_> {
    /// Tables sized so that `processes` storm processes of `files` pairs each fit: an
    /// exited process's pairs stay in the kernel for `ledger.exit_grace`, longer than any
    /// step.
    fn daemon_args(&self, processes: u64, files: usize) -> Vec<String> {
        let pairs = processes * files as u64 * 5 / 4;
        vec![
            "--no-default-paths".into(),
            "--prefix".into(),
            self.prefix.clone(),
            "--set".into(),
            format!(
                "probe.max_accesses={}",
                pairs.next_power_of_two().max(DEFAULT_MAX_ACCESSES)
            ),
            "--set".into(),
            format!(
                "ledger.max_processes={}",
                (processes * 5 / 4).next_power_of_two().max(65_536)
            ),
        ]
    }

    fn plan(&self, step: &Step) -> Plan<'_> {
        let rate = match step.kind {
            Kind::Paced { opens_per_s } => Some(opens_per_s as f64 / step.files as f64),
            Kind::Max { .. } => None,
        };
        Plan {
            paths: &self.paths[..step.files],
            drivers: self.drivers,
            rate,
            duration: Duration::from_secs(self.args.seconds),
            max_processes: self.args.max_processes,
        }
    }
}

fn run_step(setup: &Setup, step: &Step) -> Result<Run> {
    let plan = setup.plan(step);
    if step.kind == (Kind::Max { daemon: false }) {
        let storm = Storm::start(&plan)?.finish()?;
        return Ok(Run {
            storm,
            ..Run::default()
        });
    }
    let mut daemon = Daemon::launch(
        setup.bin,
        &setup.daemon_args(setup.args.max_processes, step.files),
        DaemonSetup::default(),
    )?;
    // Start-up work (the first scan, the first save) is not the storm's.
    harness::sleep(Duration::from_millis(500))?;
    let before = daemon.scrape()?;
    let cpu = CpuMeter::start(daemon.pid())?;
    let storm = Storm::start(&plan)?.finish()?;
    let expected = storm.processes * (step.files as u64 + 1);
    let (after, caught_up) = catch_up(&mut daemon, &before, expected)?;
    let (daemon_cpu, _) = cpu.read()?;
    let delivered = records(&after) - records(&before);
    let accesses = after.events("access") - before.events("access");
    let lost = lost_between(&before, &after);
    let lost_total: u64 = lost.values().sum();
    daemon.stop()?;
    Ok(Run {
        storm,
        expected,
        delivered,
        accesses,
        unaccounted: expected.saturating_sub(delivered + lost_total),
        lost,
        catch_up: caught_up,
        daemon_cpu,
    })
}

/// Whether a loss reason stands for a record the daemon never got: the probe's, where a
/// record was not written, and the daemon's own `undecodable_record`. The others count
/// other things (an fd evicted, a path cut, a process evicted from the ledger, a catalog
/// version dropped): counted as records, a storm's routine evictions made the wait
/// below end before the queue was drained.
fn stands_for_a_record(reason: &str) -> bool {
    use trustdrift_common::Loss;
    const RECORD_NOT_WRITTEN: [Loss; 6] = [
        Loss::RingbufFull,
        Loss::AccessTableFull,
        Loss::ProcTableFull,
        Loss::ProcessQuota,
        Loss::OwnerQuota,
        Loss::PathUnreadable,
    ];
    reason == "undecodable_record" || RECORD_NOT_WRITTEN.iter().any(|l| l.name() == reason)
}

/// Waits until every record of a storm that just ended is delivered or counted lost, or
/// nothing has moved for 5 s; the last scrape, and how long it took.
pub(super) fn catch_up(
    daemon: &mut Daemon,
    before: &Metrics,
    expected: u64,
) -> Result<(Metrics, Duration)> {
    let storm_end = Instant::now();
    let mut last_progress = (0u64, Instant::now());
    loop {
        harness::check_interrupt()?;
        daemon.ensure_running()?;
        let now = daemon.scrape()?;
        let delivered = records(&now) - records(before);
        let lost: u64 = lost_between(before, &now)
            .iter()
            .filter(|(reason, _)| stands_for_a_record(reason))
            .map(|(_, n)| n)
            .sum();
        if delivered + lost >= expected {
            return Ok((now, storm_end.elapsed()));
        }
        if delivered + lost != last_progress.0 {
            last_progress = (delivered + lost, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(5) {
            // Nothing moved for 5 s: what is missing is not coming.
            return Ok((now, last_progress.1.saturating_duration_since(storm_end)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn records(m: &Metrics) -> u64 {
    m.events("access") + m.events("exit") + m.events("exec")
}

/// With the default capacities: whether a storm at `rate` making 1.5x the access table's
/// pairs fills it (exited processes' pairs leave it at their exit), and when.
struct Capacity {
    opens_per_s: f64,
    first_loss: Option<(Duration, u64)>,
    ran_for: Duration,
}

fn capacity_run(setup: &Setup) -> Result<Capacity> {
    let files = setup.args.files;
    let rate = setup.args.capacity_rate as f64;
    let seconds = (1.5 * DEFAULT_MAX_ACCESSES as f64 / rate).ceil() as u64;
    let daemon = Daemon::launch(
        setup.bin,
        &[
            "--no-default-paths".into(),
            "--prefix".into(),
            setup.prefix.clone(),
        ],
        DaemonSetup::default(),
    )?;
    harness::sleep(Duration::from_millis(500))?;
    let before = daemon.scrape()?;
    let plan = Plan {
        paths: &setup.paths[..files],
        drivers: setup.drivers,
        rate: Some(rate / files as f64),
        duration: Duration::from_secs(seconds),
        max_processes: u64::MAX,
    };
    let started = Instant::now();
    let mut storm = Storm::start(&plan)?;
    let mut first_loss = None;
    while !storm.is_done() {
        harness::check_interrupt()?;
        let now = daemon.scrape()?;
        if lost_between(&before, &now).contains_key("access_table_full") {
            let pairs = now.events("access") - before.events("access");
            first_loss = Some((started.elapsed(), pairs));
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let ran_for = started.elapsed();
    // Dropping the storm stops it: what follows the first loss is not measured.
    drop(storm);
    daemon.stop()?;
    Ok(Capacity {
        opens_per_s: rate,
        first_loss,
        ran_for,
    })
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    if args.files == 0 || args.max_files.contains(&0) || args.rounds == 0 {
        bail!("--files, --max-files and --rounds must be at least 1");
    }
    let most_files = args
        .max_files
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.files);
    let dir = TempDir::try_new("bench-throughput")?;
    let store = dir.join("store");
    fs::create_dir_all(&store).context("creating the store dir")?;
    let ca = harness::cas("Throughput", 1);
    let mut paths = Vec::new();
    for i in 0..most_files {
        let path = store.join(format!("trust-{i}.pem"));
        fs::write(&path, &ca[0].pem).with_context(|| format!("writing {}", path.display()))?;
        paths.push(CString::new(path.as_os_str().as_encoded_bytes())?);
    }
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let setup = Setup {
        bin: trustdrift,
        prefix: format!("{}/", store.display()),
        paths,
        drivers: args.drivers.unwrap_or(cpus).max(1),
        args,
    };

    let mut steps: Vec<Step> = args
        .rates
        .iter()
        .map(|&r| Step {
            kind: Kind::Paced { opens_per_s: r },
            files: args.files,
        })
        .collect();
    for &files in &args.max_files {
        for daemon in [true, false] {
            steps.push(Step {
                kind: Kind::Max { daemon },
                files,
            });
        }
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); steps.len()];
    for round in 0..args.rounds {
        for (i, step) in steps.iter().enumerate() {
            let r = run_step(&setup, step)?;
            eprintln!(
                "xtask: round {} {:<28} {:>2} files: storm {:>8.0} opens/s ({:.0} processes/s), \
                 delivered {}/{} records, lost {}, unaccounted {}, caught up {:.2} s after, \
                 daemon {:.2} CPU s",
                round + 1,
                step.name(),
                step.files,
                r.storm_opens_per_s(step.files),
                r.storm.processes_per_second(),
                r.delivered,
                r.expected,
                r.lost_total(),
                r.unaccounted,
                r.catch_up.as_secs_f64(),
                r.daemon_cpu,
            );
            runs[i].push(r);
        }
    }
    eprintln!(
        "xtask: default capacities, {} opens/s: does the access table fill?",
        args.capacity_rate
    );
    let capacity = capacity_run(&setup)?;
    let report = render(&setup, &steps, &runs, &capacity);
    print!("{report}");
    if !args.no_write {
        write_section("throughput", &report)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}

fn med(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    median(&mut v)
}

/// The highest paced storm (its median achieved rate) with zero loss in every round.
fn highest_clean(steps: &[Step], runs: &[Vec<Run>]) -> Option<f64> {
    steps
        .iter()
        .zip(runs)
        .filter(|(st, runs)| {
            matches!(st.kind, Kind::Paced { .. })
                && runs
                    .iter()
                    .all(|r| r.lost_total() == 0 && r.unaccounted == 0)
        })
        .map(|(st, runs)| med(runs, |r| r.storm_opens_per_s(st.files)))
        .fold(None, |best: Option<f64>, v| {
            Some(best.map_or(v, |b| b.max(v)))
        })
}

fn render(setup: &Setup, steps: &[Step], runs: &[Vec<Run>], capacity: &Capacity) -> String {
    let args = setup.args;
    let mut s = String::new();
    s.push_str(&format!(
        "Storm processes forked by {} drivers (a plain fork, no exec: the cheapest process \
         there is), each opening and reading (4 KiB) F trust files once, then exiting: every \
         open is a new (process, path) pair, so a record the probe must deliver, plus one \
         exit record per process. Paced steps at F = {}, then full speed at F = {}, with \
         and without the daemon. A fresh daemon per step, `--no-default-paths --prefix DIR/` \
         (only the storm matches, so the counts are exact), tables sized so a step's pairs \
         fit (`probe.max_accesses` = 1.25 x {} x F rounded up to a power of two, \
         `ledger.max_processes` >= 65536; see the last line for the defaults); {} s per \
         step, at most {} processes; {} rounds, medians (a storm held for minutes: `cargo \
         xtask bench storm`). The daemon runs at its default `probe.priority_boost` (nice -5); \
         nothing is pinned and the drivers are not reniced. \
         Delivered and lost from /metrics deltas (`trustdrift_events_total`, \
         `trustdrift_events_lost_total`); {}.\n\n",
        setup.drivers,
        args.files,
        args.max_files
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.max_processes,
        args.seconds,
        args.max_processes,
        args.rounds,
        harness::machine(),
    ));
    s.push_str(
        "| step | F | storm opens/s | processes/s | delivered opens/s | lost (all rounds) | \
         caught up after | daemon CPU | daemon µs/record |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (step, runs) in steps.iter().zip(runs) {
        let f = step.files;
        let storm = med(runs, |r| r.storm_opens_per_s(f));
        let procs = med(runs, |r| r.storm.processes_per_second());
        if step.kind == (Kind::Max { daemon: false }) {
            s.push_str(&format!(
                "| {} | {f} | {storm:.0} | {procs:.0} | | | | | |\n",
                step.name()
            ));
            continue;
        }
        let lost: u64 = runs.iter().map(Run::lost_total).sum();
        let unaccounted: u64 = runs.iter().map(|r| r.unaccounted).sum();
        let expected: u64 = runs.iter().map(|r| r.expected).sum();
        let mut lost_cell = if lost == 0 {
            "0".to_owned()
        } else {
            format!(
                "{lost} ({:.2}%: {})",
                100.0 * lost as f64 / expected.max(1) as f64,
                reasons(runs)
            )
        };
        if unaccounted > 0 {
            lost_cell.push_str(&format!(", {unaccounted} unaccounted"));
        }
        s.push_str(&format!(
            "| {} | {f} | {storm:.0} | {procs:.0} | {:.0} | {lost_cell} | {:.2} s | {:.0}% | {:.1} |\n",
            step.name(),
            med(runs, Run::delivered_opens_per_s),
            med(runs, |r| r.catch_up.as_secs_f64()),
            100.0 * med(runs, |r| r.daemon_cpu
                / (r.storm.elapsed + r.catch_up).as_secs_f64().max(1e-9)),
            med(runs, |r| 1e6 * r.daemon_cpu / r.delivered.max(1) as f64),
        ));
    }
    s.push('\n');

    let mut lines = Vec::new();
    let find = |kind: Kind, files: usize| {
        steps
            .iter()
            .position(|st| st.kind == kind && st.files == files)
            .map(|i| &runs[i])
    };
    // Every full-speed step is a fastest storm (of processes opening F files each): the
    // target holds only if none of them lost anything.
    let full: Vec<(usize, &Vec<Run>)> = args
        .max_files
        .iter()
        .filter_map(|&mf| Some((mf, find(Kind::Max { daemon: true }, mf)?)))
        .collect();
    if let Some((fastest_f, fastest)) = full.iter().max_by(|a, b| {
        med(a.1, |r| r.storm_opens_per_s(a.0)).total_cmp(&med(b.1, |r| r.storm_opens_per_s(b.0)))
    }) {
        let lost: u64 = full
            .iter()
            .flat_map(|(_, r)| r.iter())
            .map(Run::lost_total)
            .sum();
        let unaccounted: u64 = full
            .iter()
            .flat_map(|(_, r)| r.iter())
            .map(|r| r.unaccounted)
            .sum();
        let fs: Vec<String> = full.iter().map(|(mf, _)| mf.to_string()).collect();
        lines.push(format!(
            "- zero loss at the fastest storms {} CPUs fork while the daemon runs (full speed \
             at F = {}; the fastest {:.0} matched opens/s at F = {fastest_f}): {} lost, {} \
             unaccounted over {} rounds each: {}",
            setup.drivers,
            fs.join(", "),
            med(fastest, |r| r.storm_opens_per_s(*fastest_f)),
            lost,
            unaccounted,
            fastest.len(),
            verdict(lost == 0 && unaccounted == 0)
        ));
    }
    if let Some(best) = highest_clean(steps, runs) {
        lines.push(format!(
            "- highest paced storm with zero loss in every round: {best:.0} matched opens/s \
             (in {} s bursts)",
            args.seconds
        ));
    }
    for &mf in &args.max_files {
        if let (Some(with), Some(without)) = (
            find(Kind::Max { daemon: true }, mf),
            find(Kind::Max { daemon: false }, mf),
        ) {
            let p_with = med(with, |r| r.storm.processes_per_second());
            let p_without = med(without, |r| r.storm.processes_per_second());
            let storm_us = med(with, |r| {
                1e6 * r.storm.cpu_seconds / r.storm.processes.max(1) as f64
            });
            let record_us = med(with, |r| 1e6 * r.daemon_cpu / r.delivered.max(1) as f64);
            let share = med(with, |r| {
                r.daemon_cpu / (r.storm.elapsed + r.catch_up).as_secs_f64().max(1e-9)
            });
            lines.push(format!(
                "- full speed at F = {mf}: {p_without:.0} processes/s without the daemon, \
                 {p_with:.0} with it ({:.2}x); a storm process costs {storm_us:.0} µs of CPU \
                 (fork, {mf} open+read+close, exit, reap; probe hooks included), while the \
                 daemon spent {record_us:.0} µs per record it handled ({:.0} µs for a \
                 process's {} records) and got {:.0}% of a core",
                p_with / p_without.max(1e-9),
                record_us * (mf as f64 + 1.0),
                mf + 1,
                100.0 * share,
            ));
        }
    }
    let pairs = capacity.opens_per_s * capacity.ran_for.as_secs_f64();
    let measured = match capacity.first_loss {
        Some((t, pairs)) => format!(
            "the first `access_table_full` loss after {:.1} s, with {pairs} pairs delivered",
            t.as_secs_f64()
        ),
        None => format!(
            "no `access_table_full` loss in {:.1} s ({pairs:.0} pairs, {:.1}x the table)",
            capacity.ran_for.as_secs_f64(),
            pairs / DEFAULT_MAX_ACCESSES as f64
        ),
    };
    lines.push(format!(
        "- with the default capacities: an exited process's pairs leave the kernel at its \
         exit, so the access table ({DEFAULT_MAX_ACCESSES} pairs) bounds the pairs of live \
         processes and of records not yet handled, not a storm's length (before, they stayed \
         for `ledger.exit_grace`, {DEFAULT_EXIT_GRACE_S} s, and a storm above \
         {:.0} pairs/s filled it); at {:.0} opens/s: {measured}",
        DEFAULT_MAX_ACCESSES as f64 / DEFAULT_EXIT_GRACE_S as f64,
        capacity.opens_per_s,
    ));
    s.push_str(&lines.join("\n"));
    s.push('\n');
    s
}

/// Loss reasons over all rounds of a step, largest first.
fn reasons(runs: &[Run]) -> String {
    let mut by: BTreeMap<&str, u64> = BTreeMap::new();
    for r in runs {
        for (k, v) in &r.lost {
            *by.entry(k.as_str()).or_default() += v;
        }
    }
    let mut v: Vec<(&str, u64)> = by.into_iter().collect();
    v.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
