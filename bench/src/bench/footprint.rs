//! `cargo xtask bench footprint`: the daemon's memory and CPU at idle, then with 1,000 and
//! 10,000 live processes holding trust reads. The readers are forked from this process
//! (pages shared, a few dozen KiB each), each reads one of a few CA bundles, then blocks;
//! one daemon sees them arrive in steps.

use std::{
    ffi::CString,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use trustdrift_testkit::{Daemon, DaemonSetup, TempDir};

use super::{verdict, write_section};
use crate::harness::{
    self, Metrics, Scrape,
    fleet::Fleet,
    lost_between,
    procstat::{self, CpuMeter, Memory},
};

const COMM: &std::ffi::CStr = c"td-footprint";

#[derive(clap::Args)]
pub struct Args {
    /// Live readers at each loaded step (cumulative: each step adds to the last).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    counts: Vec<usize>,
    /// Seconds the idle daemon is measured over.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Seconds each loaded step is measured over.
    #[arg(long, default_value_t = 60)]
    window_seconds: u64,
    /// Seconds left to settle before each measurement (start-up; the readers' arrival).
    #[arg(long, default_value_t = 10)]
    settle_seconds: u64,
    /// CA bundles the readers read (reader i reads bundle i mod this).
    #[arg(long, default_value_t = 10)]
    stores: usize,
    /// Readers started per second.
    #[arg(long, default_value_t = 1000)]
    spawn_rate: u64,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

struct Row {
    name: String,
    readers: usize,
    memory: Memory,
    cpu_share: f64,
    window: Duration,
    tracked: u64,
    accesses: u64,
    procs: u64,
}

fn measure(
    daemon: &mut Daemon,
    name: String,
    readers: usize,
    settle: Duration,
    window: Duration,
) -> Result<Row> {
    harness::sleep(settle)?;
    daemon.ensure_running()?;
    // Nothing of ours touches the daemon inside the window: no scrape, no spawn.
    let cpu = CpuMeter::start(daemon.pid())?;
    harness::sleep(window)?;
    let (used, wall) = cpu.read()?;
    let memory = procstat::memory(daemon.pid())?;
    let m = daemon.scrape()?;
    let row = Row {
        name,
        readers,
        memory,
        cpu_share: used / wall,
        window: Duration::from_secs_f64(wall),
        tracked: m.tracked("processes"),
        accesses: m.sum("trustdrift_bpf_map_entries", &[("map", "accesses")]) as u64,
        procs: m.sum("trustdrift_bpf_map_entries", &[("map", "procs")]) as u64,
    };
    eprintln!(
        "xtask: {:<22} RSS {:6.1} MiB, HWM {:6.1} MiB, CPU {:5.2}% of a core over {:.0} s; \
         tracked {} processes",
        row.name,
        row.memory.rss_mib(),
        row.memory.hwm_mib(),
        100.0 * row.cpu_share,
        wall,
        row.tracked
    );
    Ok(row)
}

fn fresh(m: &Metrics) -> u64 {
    m.sum("trustdrift_processes", &[("verdict", "fresh")]) as u64
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    harness::raise_fd_limit();
    if args.stores == 0 || args.spawn_rate == 0 {
        bail!("--stores and --spawn-rate must be at least 1");
    }
    let dir = TempDir::try_new("bench-footprint")?;
    let store = dir.join("store");
    fs::create_dir_all(&store).context("creating the store dir")?;
    let cas = harness::cas("Footprint", args.stores + 2);
    let mut paths = Vec::new();
    for i in 0..args.stores {
        let path = store.join(format!("bundle-{i}.pem"));
        // Three CAs each, different sets: each bundle is its own content.
        let which = [i, i + 1, i + 2].into_iter().collect();
        fs::write(&path, harness::bundle(&cas, &which))
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(CString::new(path.as_os_str().as_encoded_bytes())?);
    }

    let mut daemon = Daemon::launch(
        trustdrift,
        &["--prefix".into(), format!("{}/", store.display())],
        DaemonSetup::default(),
    )?;
    let settle = Duration::from_secs(args.settle_seconds);
    let mut rows = vec![measure(
        &mut daemon,
        "idle".into(),
        0,
        settle,
        Duration::from_secs(args.idle_seconds),
    )?];
    let start_metrics = daemon.scrape()?;
    let baseline_fresh = fresh(&start_metrics);

    let mut fleet = Fleet::new()?;
    let mut failed_reads = 0usize;
    let mut spawned = 0usize;
    let mut notes = Vec::new();
    for &count in &args.counts {
        if count <= spawned {
            continue;
        }
        let started = Instant::now();
        let first = spawned;
        while spawned < count {
            harness::check_interrupt()?;
            let due = started
                + Duration::from_secs_f64((spawned - first) as f64 / args.spawn_rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let path = std::slice::from_ref(&paths[spawned % paths.len()]);
            fleet
                .spawn(COMM, path)
                .with_context(|| format!("starting reader {}", spawned + 1))?;
            spawned += 1;
            failed_reads += fleet
                .replies()?
                .iter()
                .filter(|r| r.outcome.is_err())
                .count();
        }
        // Every reader seen and judged before measuring.
        let deadline = Instant::now() + Duration::from_secs(120);
        let seen = loop {
            harness::check_interrupt()?;
            daemon.ensure_running()?;
            failed_reads += fleet
                .replies()?
                .iter()
                .filter(|r| r.outcome.is_err())
                .count();
            let seen = fresh(&daemon.scrape()?).saturating_sub(baseline_fresh);
            if seen >= count as u64 || Instant::now() > deadline {
                break seen;
            }
            harness::sleep(Duration::from_millis(500))?;
        };
        if seen < count as u64 {
            notes.push(format!(
                "only {seen} of {count} readers were counted fresh after 120 s"
            ));
        }
        eprintln!(
            "xtask: {count} readers live ({:.1} s to start them all), {seen} counted fresh",
            started.elapsed().as_secs_f64()
        );
        let casualties = fleet.casualties();
        if !casualties.is_empty() {
            bail!("{} readers died unexpectedly", casualties.len());
        }
        rows.push(measure(
            &mut daemon,
            format!("{count} live readers"),
            count,
            settle,
            Duration::from_secs(args.window_seconds),
        )?);
    }
    let lost = lost_between(&start_metrics, &daemon.scrape()?);
    drop(fleet);
    daemon.stop()?;
    if failed_reads > 0 {
        notes.push(format!(
            "{failed_reads} readers failed to read their bundle"
        ));
    }

    let report = render(args, &rows, &lost, &notes);
    print!("{report}");
    if !args.no_write {
        write_section("footprint", &report)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}

fn render(
    args: &Args,
    rows: &[Row],
    lost: &std::collections::BTreeMap<String, u64>,
    notes: &[String],
) -> String {
    let mut s = format!(
        "One daemon (default configuration and capacities, `--prefix` on a temp dir), idle, \
         then with live readers added in steps at {}/s: processes forked from one small \
         process, each reading one of {} CA bundles (3 CAs each) and then blocking, so each \
         is a live process with one trust read. After {} s to settle, CPU is utime+stime \
         from /proc/PID/stat over the window (nothing scrapes the daemon meanwhile), RSS and \
         its peak (VmHWM, which includes the readers' arrival) from /proc/PID/status at its \
         end. {}.\n\n",
        args.spawn_rate,
        args.stores,
        args.settle_seconds,
        harness::machine()
    );
    s.push_str(
        "| state | RSS MiB | of which heap (anon) / binary (file) | peak RSS (VmHWM) MiB | CPU, % of a core | window s | processes tracked | kernel procs / accesses entries |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} / {:.1} | {:.1} | {:.2} | {:.0} | {} | {} / {} |\n",
            r.name,
            r.memory.rss_mib(),
            r.memory.anon_mib(),
            r.memory.file_mib(),
            r.memory.hwm_mib(),
            100.0 * r.cpu_share,
            r.window.as_secs_f64(),
            r.tracked,
            r.procs,
            r.accesses
        ));
    }
    s.push('\n');
    let mut lines = Vec::new();
    if let Some(idle) = rows.first() {
        lines.push(format!(
            "- idle CPU: {:.2}% of a core (target < 1%): {}",
            100.0 * idle.cpu_share,
            verdict(idle.cpu_share < 0.01)
        ));
    }
    match rows.iter().find(|r| r.readers == 10_000) {
        Some(r) => lines.push(format!(
            "- RSS with 10,000 live readers: {:.1} MiB, peak {:.1} MiB (target < 64 MiB): {}",
            r.memory.rss_mib(),
            r.memory.hwm_mib(),
            verdict(r.memory.rss_kib < 64 * 1024)
        )),
        None => lines.push("- RSS with 10,000 live readers: not measured (see --counts)".into()),
    }
    if let (Some(idle), Some(last)) = (rows.first(), rows.last())
        && last.readers > 0
    {
        lines.push(format!(
            "- memory per live reader: {:.1} KiB ((RSS with {} - idle RSS) / {})",
            (last.memory.rss_kib as f64 - idle.memory.rss_kib as f64) / last.readers as f64,
            last.readers,
            last.readers
        ));
    }
    lines.push(if lost.is_empty() {
        "- losses: none".into()
    } else {
        format!("- losses: {lost:?}")
    });
    lines.extend(notes.iter().map(|n| format!("- {n}")));
    s.push_str(&lines.join("\n"));
    s.push('\n');
    s
}
