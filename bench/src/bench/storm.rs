//! `cargo xtask bench storm`: a paced storm held for minutes against a daemon with its
//! default capacities. Whether the daemon's cost per record stays flat as the processes
//! it tracks pile up (its ledger keeps exited ones for `ledger.exit_grace`, up to
//! `ledger.max_processes`), whether anything is lost, and whether its memory comes back
//! to idle once the storm's processes have left.

use std::{
    ffi::CString,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use trustdrift_testkit::{Daemon, DaemonSetup, TempDir};

use super::{
    throughput::{catch_up, records},
    verdict, write_section,
};
use crate::harness::{
    self, Scrape, lost_between,
    procstat::{self, CpuMeter},
    storm::{Plan, Storm},
};

/// Losses that are no loss: an exited process's listing ending before its grace to
/// make room (its verdict was final).
const ROUTINE: &[&str] = &["ledger_processes_evicted"];
/// The target: the last window's µs per record at most this times the first's.
const FLAT: f64 = 1.2;
/// And memory after the storm within this share of idle.
const BACK_TO_IDLE: f64 = 0.10;

#[derive(clap::Args)]
pub struct Args {
    /// Matched opens per second (storm processes/s x --files).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Trust files each storm process opens and reads.
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Seconds the storm lasts.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// The daemon's `ledger.exit_grace`, waited for after the storm before memory is
    /// measured again (the daemon's default: 5m).
    #[arg(long, default_value = "5m")]
    exit_grace: String,
    /// Forking processes (default: one per CPU).
    #[arg(long)]
    drivers: Option<usize>,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

/// One 5-second window of the storm.
struct Window {
    end: Duration,
    tracked: u64,
    delivered_per_s: f64,
    lost: u64,
    cpu_share: f64,
    us_per_record: f64,
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    if args.files == 0 || args.rate == 0 || args.seconds < 10 {
        bail!("--files and --rate must be at least 1, --seconds at least 10");
    }
    let grace = humantime::parse_duration(&args.exit_grace).context("--exit-grace")?;
    let dir = TempDir::try_new("bench-storm")?;
    let store = dir.join("store");
    fs::create_dir_all(&store).context("creating the store dir")?;
    let ca = harness::cas("Storm", 1);
    let mut paths = Vec::new();
    for i in 0..args.files {
        let path = store.join(format!("trust-{i}.pem"));
        fs::write(&path, &ca[0].pem).with_context(|| format!("writing {}", path.display()))?;
        paths.push(CString::new(path.as_os_str().as_encoded_bytes())?);
    }
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let drivers = args.drivers.unwrap_or(cpus).max(1);
    // Default capacities: only the trust paths (so the counts are exact) and the grace.
    let daemon_args = [
        "--no-default-paths".to_owned(),
        "--prefix".to_owned(),
        format!("{}/", store.display()),
        "--set".to_owned(),
        format!("ledger.exit_grace={}", args.exit_grace),
    ];
    let mut daemon = Daemon::launch(trustdrift, &daemon_args, DaemonSetup::default())?;
    // Idle: start-up done, its memory given back.
    harness::sleep(Duration::from_secs(10))?;
    let idle = procstat::memory(daemon.pid())?;
    let before = daemon.scrape()?;
    let plan = Plan {
        paths: &paths,
        drivers,
        rate: Some(args.rate as f64 / args.files as f64),
        duration: Duration::from_secs(args.seconds),
        max_processes: u64::MAX,
    };
    eprintln!(
        "xtask: storm at {} matched opens/s for {} s, then {} of grace",
        args.rate, args.seconds, args.exit_grace
    );
    let started = Instant::now();
    let mut storm = Storm::start(&plan)?;
    let mut windows = Vec::new();
    let (mut last, mut cpu) = (before.clone(), CpuMeter::start(daemon.pid())?);
    let every = Duration::from_secs(5);
    let mut peak_rss: f64 = 0.0;
    let mut peak_at = idle;
    while !storm.is_done() {
        harness::check_interrupt()?;
        daemon.ensure_running()?;
        let next = started + every * (windows.len() as u32 + 1);
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let now = daemon.scrape()?;
        let (used, wall) = cpu.read()?;
        cpu = CpuMeter::start(daemon.pid())?;
        let memory = procstat::memory(daemon.pid())?;
        if memory.rss_mib() > peak_rss {
            peak_rss = memory.rss_mib();
            peak_at = memory;
        }
        let delivered = records(&now) - records(&last);
        let w = Window {
            end: started.elapsed(),
            tracked: now.tracked("processes"),
            delivered_per_s: (now.events("access") - last.events("access")) as f64 / wall,
            lost: lost_between(&last, &now)
                .iter()
                .filter(|(reason, _)| !ROUTINE.contains(&reason.as_str()))
                .map(|(_, n)| n)
                .sum(),
            cpu_share: used / wall,
            us_per_record: 1e6 * used / delivered.max(1) as f64,
        };
        eprintln!(
            "xtask:   {:>5.1} s: {} processes tracked, {:.0} opens/s delivered, {} lost, \
             daemon {:.0}% CPU, {:.1} µs/record, RSS at most {:.1} MiB (anon {:.1}, file {:.1})",
            w.end.as_secs_f64(),
            w.tracked,
            w.delivered_per_s,
            w.lost,
            100.0 * w.cpu_share,
            w.us_per_record,
            peak_rss,
            peak_at.anon_mib(),
            peak_at.file_mib()
        );
        windows.push(w);
        last = now;
    }
    let outcome = storm.finish()?;
    let expected = outcome.processes * (args.files as u64 + 1);
    let (after, caught_up) = catch_up(&mut daemon, &before, expected)?;
    let delivered = records(&after) - records(&before);
    let lost = lost_between(&before, &after);
    let (routine, lost): (Vec<_>, Vec<_>) = lost
        .into_iter()
        .partition(|(reason, _)| ROUTINE.contains(&reason.as_str()));
    let lost_total: u64 = lost.iter().map(|(_, n)| n).sum();
    let routine_total: u64 = routine.iter().map(|(_, n)| n).sum();
    // The storm's processes have exited; they leave the ledger after the grace, at the
    // next housekeeping (every 5 s).
    eprintln!("xtask: waiting {} for the exit grace", args.exit_grace);
    harness::sleep(grace + Duration::from_secs(12))?;
    let left = daemon.scrape()?;
    let after_grace = procstat::memory(daemon.pid())?;
    daemon.stop()?;

    let first = windows.first();
    let last = windows.last();
    let flat = match (first, last) {
        (Some(a), Some(b)) => b.us_per_record / a.us_per_record.max(1e-9),
        _ => f64::NAN,
    };
    let back = after_grace.rss_mib() / idle.rss_mib().max(1e-9) - 1.0;
    let mut s = String::new();
    s.push_str(&format!(
        "A paced storm of {} matched opens/s ({} trust files per storm process, {} drivers \
         forking plain processes that open, read and exit) for {} s against one daemon with \
         its default capacities (`--no-default-paths --prefix DIR/` so that the counts are \
         exact, `ledger.exit_grace` = {}); CPU per 5-second window from /proc, records and \
         losses from /metrics deltas. Memory: RSS idle (10 s after start), highest sampled \
         during the storm, and after the storm's processes left (grace + 12 s). {}.\n\n",
        args.rate,
        args.files,
        drivers,
        args.seconds,
        args.exit_grace,
        harness::machine(),
    ));
    s.push_str(
        "| window ending | processes tracked | delivered opens/s | lost | daemon CPU | daemon \
         µs/record |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    let shown: Vec<&Window> = windows
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 6 == 0 || *i + 1 == windows.len())
        .map(|(_, w)| w)
        .collect();
    for w in shown {
        s.push_str(&format!(
            "| {:.0} s | {} | {:.0} | {} | {:.0}% | {:.1} |\n",
            w.end.as_secs_f64(),
            w.tracked,
            w.delivered_per_s,
            w.lost,
            100.0 * w.cpu_share,
            w.us_per_record
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "- µs per record, last window against the first: {flat:.2}x (target <= {FLAT}x): {}\n",
        verdict(flat <= FLAT)
    ));
    s.push_str(&format!(
        "- lost: {lost_total} of {expected} records ({delivered} delivered, caught up {:.2} s \
         after the storm){}; {routine_total} exited processes left the ledger before their \
         grace to make room (`ledger_processes_evicted`, routine: `ledger.max_processes` \
         bounds the ledger, exited processes go first): {}\n",
        caught_up.as_secs_f64(),
        if lost.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                lost.iter()
                    .map(|(r, n)| format!("{r}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        verdict(lost_total == 0)
    ));
    s.push_str(&format!(
        "- RSS: {:.1} MiB idle (anon {:.1}, file {:.1}), {:.1} MiB at most during the storm (anon {:.1}, file {:.1}), \
         {:.1} MiB once its processes left (anon {:.1}, file {:.1}; {} tracked): {:+.1}% of \
         idle (target within {:.0}%): {}\n",
        idle.rss_mib(),
        idle.anon_mib(),
        idle.file_mib(),
        peak_rss,
        peak_at.anon_mib(),
        peak_at.file_mib(),
        after_grace.rss_mib(),
        after_grace.anon_mib(),
        after_grace.file_mib(),
        left.tracked("processes"),
        100.0 * back,
        100.0 * BACK_TO_IDLE,
        verdict(back.abs() <= BACK_TO_IDLE)
    ));
    print!("{s}");
    if !args.no_write {
        write_section("storm", &s)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}
