//! `cargo xtask bench startup`: how time to `/readyz` grows with the processes already
//! running on the node. Idle processes are forked from this process (each closes every
//! fd it inherited and waits in `pause()`). Every round visits every count (ascending in
//! one round, descending in the next, forking or killing children to get there), and at
//! each daemons start in turn with the start-up scan reading /proc (`probe.seed =
//! "procfs"`) and through the probe's task iterators (`auto`), A/B. Growth is taken
//! within each round, then the median over rounds: load from elsewhere on the machine
//! that comes and goes during the run falls on every count alike.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use trustdrift_testkit::{Daemon, DaemonSetup};

use super::{median, verdict, write_section};
use crate::harness;

/// At most this much more time to `/readyz` per 1,000 extra idle processes.
const TARGET_MS_PER_1000: f64 = 30.0;

#[derive(clap::Args)]
pub struct Args {
    /// Extra idle processes at each step (cumulative, ascending).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,10000")]
    counts: Vec<usize>,
    /// Daemon starts per variant and step.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

/// How the start-up scan reads what running processes hold.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Procfs,
    Iterators,
}

impl Variant {
    fn setting(self) -> &'static str {
        match self {
            Self::Procfs => "probe.seed=procfs",
            Self::Iterators => "probe.seed=auto",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Procfs => "procfs scan",
            Self::Iterators => "task iterators",
        }
    }

    /// What the daemon's log must say it used.
    fn logged(self) -> &'static str {
        match self {
            Self::Procfs => "with=\"procfs\"",
            Self::Iterators => "with=\"bpf task iterators\"",
        }
    }
}

/// Idle children of this process: each holds nothing and waits; all are killed and
/// reaped when this is dropped (and die with this process if it is killed).
struct Idle {
    pids: Vec<libc::pid_t>,
}

impl Idle {
    /// Forks or kills children until there are `count`.
    fn resize_to(&mut self, count: usize) -> Result<()> {
        if self.pids.len() > count {
            let extra = self.pids.split_off(count);
            kill_and_reap(&extra);
        }
        self.grow_to(count)
    }

    fn grow_to(&mut self, count: usize) -> Result<()> {
        while self.pids.len() < count {
            // SAFETY: this process is single-threaded (the harness starts no thread); the
            // child makes only async-signal-safe calls and never returns.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                bail!(
                    "forking idle process {}: {}",
                    self.pids.len() + 1,
                    std::io::Error::last_os_error()
                );
            }
            if pid == 0 {
                // SAFETY: async-signal-safe calls only, then pause forever.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                    loop {
                        libc::pause();
                    }
                }
            }
            self.pids.push(pid);
        }
        Ok(())
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        kill_and_reap(&std::mem::take(&mut self.pids));
    }
}

fn kill_and_reap(pids: &[libc::pid_t]) {
    for pid in pids {
        // SAFETY: our own children, not reaped yet: their pids are still theirs.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    for pid in pids {
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(*pid, std::ptr::null_mut(), 0) };
    }
}

struct Sample {
    ready: Duration,
    /// The daemon's own account of its start-up scan (ms).
    scan_ms: Option<u64>,
}

fn start_once(trustdrift: &Path, variant: Variant) -> Result<Sample> {
    let started = Instant::now();
    let daemon = Daemon::launch(
        trustdrift,
        &["--set", variant.setting()],
        DaemonSetup::default(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ready = started.elapsed();
    let log = daemon.log();
    daemon.stop()?;
    let line = log
        .lines()
        .find(|l| l.contains("start-up scan of the processes already running"))
        .context("the daemon did not log its start-up scan")?;
    if !line.contains(variant.logged()) {
        bail!(
            "the {} variant did not scan as asked: {line}",
            variant.name()
        );
    }
    let scan_ms = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ms="))
        .and_then(|v| v.parse().ok());
    Ok(Sample { ready, scan_ms })
}

struct Row {
    extra: usize,
    /// Median time to ready and median scan time, per variant (procfs, iterators).
    ready_ms: [f64; 2],
    scan_ms: [f64; 2],
    /// Median over rounds of the growth from the first count, per 1,000 extra
    /// processes, per variant (none for the first count).
    growth: Option<[f64; 2]>,
}

/// Every sample of one count: per variant (procfs, iterators), one per round.
#[derive(Default)]
struct Samples {
    ready: [Vec<f64>; 2],
    scan: [Vec<f64>; 2],
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    if args.rounds == 0 || args.counts.is_empty() {
        bail!("--rounds and --counts must not be empty");
    }
    let mut counts = args.counts.clone();
    counts.sort_unstable();
    counts.dedup();
    let mut idle = Idle { pids: Vec::new() };
    let mut samples: Vec<Samples> = counts.iter().map(|_| Samples::default()).collect();
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..counts.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            harness::check_interrupt()?;
            let extra = counts[i];
            let t = Instant::now();
            idle.resize_to(extra)?;
            eprintln!(
                "xtask: round {}: {extra} idle processes ({:.1} s to get there)",
                round + 1,
                t.elapsed().as_secs_f64()
            );
            // Let the forks and exits settle (page tables, reclaim) before timing.
            harness::sleep(Duration::from_secs(1))?;
            // Alternate which goes first: neither always runs on a warmer cache.
            let variants = if (round + i) % 2 == 0 {
                [Variant::Procfs, Variant::Iterators]
            } else {
                [Variant::Iterators, Variant::Procfs]
            };
            for variant in variants {
                harness::check_interrupt()?;
                let v = usize::from(variant == Variant::Iterators);
                let s = start_once(trustdrift, variant)
                    .with_context(|| format!("{} with {extra} idle processes", variant.name()))?;
                samples[i].ready[v].push(s.ready.as_secs_f64() * 1000.0);
                // A missing timing keeps its place, so that rounds stay aligned.
                samples[i].scan[v].push(s.scan_ms.map_or(f64::NAN, |ms| ms as f64));
                eprintln!(
                    "xtask:   {}: ready in {} ms, scan {} ms",
                    variant.name(),
                    s.ready.as_millis(),
                    s.scan_ms.map_or("?".into(), |ms| ms.to_string())
                );
            }
        }
    }
    drop(idle);
    let rows = rows(&counts, &samples);
    for r in &rows {
        eprintln!(
            "xtask: {} idle: ready in {:.0} ms (procfs) / {:.0} ms (iterators); scan {:.0} / {:.0} ms",
            r.extra, r.ready_ms[0], r.ready_ms[1], r.scan_ms[0], r.scan_ms[1]
        );
    }
    let report = render(args, &rows);
    print!("{report}");
    if !args.no_write {
        write_section("startup", &report)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}

fn rows(counts: &[usize], samples: &[Samples]) -> Vec<Row> {
    let known = |v: &[f64]| {
        v.iter()
            .copied()
            .filter(|x| !x.is_nan())
            .collect::<Vec<_>>()
    };
    counts
        .iter()
        .zip(samples)
        .map(|(&extra, s)| {
            let growth = (extra != counts[0]).then(|| {
                let per_1000 = (extra - counts[0]) as f64 / 1000.0;
                [0, 1].map(|v| {
                    let mut within: Vec<f64> = s.ready[v]
                        .iter()
                        .zip(&samples[0].ready[v])
                        .map(|(at, base)| (at - base) / per_1000)
                        .collect();
                    median(&mut within)
                })
            });
            Row {
                extra,
                ready_ms: [0, 1].map(|v| median(&mut s.ready[v].clone())),
                scan_ms: [0, 1].map(|v| median(&mut known(&s.scan[v]))),
                growth,
            }
        })
        .collect()
}

fn render(args: &Args, rows: &[Row]) -> String {
    let mut s = format!(
        "Time from starting `trustdrift run` (default configuration, no pinning) to `/readyz` \
         answering 200, with extra idle processes on the node: forked from the bench, each \
         holding no fd and waiting in `pause()`. {} rounds; each visits every count \
         (ascending, then descending in the next round), and at each the daemon starts once \
         with each start-up scan, A/B alternating: `probe.seed = \"procfs\"` (every \
         process's maps and fds read from /proc) and `auto` (the probe's task iterators, \
         then /proc only for the processes they name). Medians; \"scan\" is the daemon's own \
         timing of the start-up scan (its log; the iterators' walks start as the start-up \
         does and run beside it, so for them it is what was left to wait for); growth is taken within each round, against \
         that round's first count, then the median over rounds. {}.\n\n",
        args.rounds,
        harness::machine()
    );
    s.push_str(
        "| extra idle processes | ready, procfs (ms) | ready, iterators (ms) | iterators / procfs | scan, procfs (ms) | scan, iterators (ms) |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |\n",
            r.extra,
            r.ready_ms[0],
            r.ready_ms[1],
            r.ready_ms[1] / r.ready_ms[0],
            r.scan_ms[0],
            r.scan_ms[1]
        ));
    }
    s.push('\n');
    let mut lines = Vec::new();
    let base = &rows[0];
    for r in rows {
        if let Some([a, b]) = r.growth {
            // The part that scales, without the noise of loading the probe.
            let scan = (r.scan_ms[1] - base.scan_ms[1]) / ((r.extra - base.extra) as f64 / 1000.0);
            lines.push(format!(
                "- growth to {} extra processes, iterators: {b:.1} ms per 1,000 (procfs: \
                 {a:.1}; the iterators' scan alone: {scan:.1}); target ≤ \
                 {TARGET_MS_PER_1000:.0} ms per 1,000: {}",
                r.extra,
                verdict(b <= TARGET_MS_PER_1000)
            ));
        }
    }
    if lines.is_empty() {
        lines.push("- growth: not measured (give --counts more than one step)".into());
    }
    s.push_str(&lines.join("\n"));
    s.push('\n');
    s
}
