//! `cargo xtask bench startup`: how time to `/readyz` grows with the processes already
//! running on the node. Idle processes are forked from this process (each closes every
//! fd it inherited and waits in `pause()`), added in steps; at each step daemons start
//! in turn with the start-up scan reading /proc (`probe.seed = "procfs"`) and through the
//! probe's task iterators (`auto`), A/B in every round, and the medians are compared.

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
    #[arg(long, default_value_t = 5)]
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
        for pid in &self.pids {
            // SAFETY: our own children, not reaped yet: their pids are still theirs.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        for pid in self.pids.drain(..) {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
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
    let mut rows = Vec::new();
    for &extra in &counts {
        harness::check_interrupt()?;
        let t = Instant::now();
        idle.grow_to(extra)?;
        eprintln!(
            "xtask: {extra} idle processes ({:.1} s to fork them)",
            t.elapsed().as_secs_f64()
        );
        // Let the forks settle (page tables, reclaim) before timing anything.
        harness::sleep(Duration::from_secs(2))?;
        let mut ready: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut scan: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..args.rounds {
            // Alternate which goes first: neither always runs on a warmer cache.
            let order = if round % 2 == 0 {
                [Variant::Procfs, Variant::Iterators]
            } else {
                [Variant::Iterators, Variant::Procfs]
            };
            for variant in order {
                harness::check_interrupt()?;
                let i = usize::from(variant == Variant::Iterators);
                let s = start_once(trustdrift, variant)
                    .with_context(|| format!("{} with {extra} idle processes", variant.name()))?;
                ready[i].push(s.ready.as_secs_f64() * 1000.0);
                if let Some(ms) = s.scan_ms {
                    scan[i].push(ms as f64);
                }
            }
        }
        let row = Row {
            extra,
            ready_ms: [median(&mut ready[0]), median(&mut ready[1])],
            scan_ms: [median(&mut scan[0]), median(&mut scan[1])],
        };
        eprintln!(
            "xtask: {extra} idle: ready in {:.0} ms (procfs) / {:.0} ms (iterators); scan {:.0} / {:.0} ms",
            row.ready_ms[0], row.ready_ms[1], row.scan_ms[0], row.scan_ms[1]
        );
        rows.push(row);
    }
    drop(idle);
    let report = render(args, &rows);
    print!("{report}");
    if !args.no_write {
        write_section("startup", &report)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}

/// Growth of the median time to ready from the first step, per 1,000 extra processes.
fn slope(base: &Row, row: &Row, i: usize) -> f64 {
    (row.ready_ms[i] - base.ready_ms[i]) / ((row.extra - base.extra) as f64 / 1000.0)
}

fn render(args: &Args, rows: &[Row]) -> String {
    let mut s = format!(
        "Time from starting `trustdrift run` (default configuration, no pinning) to `/readyz` \
         answering 200, with extra idle processes on the node: forked from the bench, each \
         holding no fd and waiting in `pause()`, added in steps. At each step the daemon \
         starts {} times with each start-up scan, A/B alternating: `probe.seed = \"procfs\"` \
         (every process's maps and fds read from /proc) and `auto` (the probe's task \
         iterators, then /proc only for the processes they name). Medians; \"scan\" is the \
         daemon's own timing of the start-up scan (its log). {}.\n\n",
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
    if let Some(base) = rows.first() {
        for r in rows.iter().skip(1) {
            let (a, b) = (slope(base, r, 0), slope(base, r, 1));
            lines.push(format!(
                "- growth to {} extra processes, iterators: {b:.1} ms per 1,000 (procfs: \
                 {a:.1}); target ≤ {TARGET_MS_PER_1000:.0} ms per 1,000: {}",
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
