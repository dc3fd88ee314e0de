//! `cargo xtask bench latency`: from a store change to the stale verdict, as an operator
//! sees it: `GET /processes/{pid}` saying `stale`, and the reader's group appearing in
//! `trustdrift_stale_processes`. A live reader holds the bundle; each change is an atomic
//! rename of a new version (other CAs); the reader then re-reads, and the next change
//! waits until the daemon calls it fresh again.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use trustdrift_testkit::{Daemon, DaemonSetup, TempDir};

use super::{verdict, write_section};
use crate::harness::{self, Rng, Scrape, fleet::Fleet, percentile};

/// The reader's comm, which names its group in the metrics.
const COMM: &std::ffi::CStr = c"td-latency";
/// CAs the versions are made of.
const POOL: usize = 6;

#[derive(clap::Args)]
pub struct Args {
    /// Store changes measured.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// How often /processes/{pid} and /metrics are polled after a change, in ms.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// A change not visible after this many seconds counts as this long (and fails p99).
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
    /// Seed of the random pause before each change (printed; for a repeat).
    #[arg(long)]
    seed: Option<u64>,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

/// Version `i`: three CAs of the pool, never the same set twice in a row.
fn version(i: usize) -> BTreeSet<usize> {
    [i % POOL, (i + 1) % POOL, (i + 3) % POOL]
        .into_iter()
        .collect()
}

fn in_metrics(daemon: &Daemon) -> Result<bool> {
    let m = daemon.scrape()?;
    let comm = COMM.to_str().unwrap_or_default();
    Ok(m.sum("trustdrift_stale_processes", &[("comm", comm)]) >= 1.0)
}

fn verdict_of(daemon: &Daemon, pid: u32) -> Result<Option<String>> {
    Ok(daemon
        .api()
        .process(pid)?
        .and_then(|p| p["verdict"].as_str().map(str::to_owned)))
}

/// Waits (polling every `every`) until `cond` holds; the time it took, or `None` after
/// `timeout`.
fn time_until(
    every: Duration,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Option<Duration>> {
    let start = Instant::now();
    loop {
        harness::check_interrupt()?;
        if cond()? {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() > timeout {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    harness::catch_interrupts()?;
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(harness::random_u64);
    let mut rng = Rng::new(seed);
    let dir = TempDir::try_new("bench-latency")?;
    let store = dir.join("store");
    fs::create_dir_all(&store).context("creating the store dir")?;
    let cas = harness::cas("Latency", POOL);
    let bundle = store.join("ca-bundle.pem");
    fs::write(&bundle, harness::bundle(&cas, &version(0)))
        .with_context(|| format!("writing {}", bundle.display()))?;

    let daemon = Daemon::launch(
        trustdrift,
        &["--prefix".into(), format!("{}/", store.display())],
        DaemonSetup::default(),
    )?;
    let mut fleet = Fleet::new()?;
    let reader = fleet.spawn(
        COMM,
        &[CString::new(bundle.as_os_str().as_encoded_bytes())?],
    )?;
    let every = Duration::from_millis(args.poll_ms.max(1));
    let timeout = Duration::from_secs(args.timeout_seconds);
    let settle = Duration::from_secs(30);
    let fresh = |daemon: &Daemon| -> Result<bool> {
        Ok(verdict_of(daemon, reader)?.as_deref() == Some("fresh") && !in_metrics(daemon)?)
    };
    if time_until(every, settle, || fresh(&daemon))?.is_none() {
        bail!(
            "the reader ({reader}) never showed as fresh: {:?}\n{}",
            daemon.api().process(reader)?,
            daemon.log_tail(20)
        );
    }
    eprintln!(
        "xtask: {} changes, polling every {} ms, seed {seed}",
        args.changes, args.poll_ms
    );

    let before = daemon.scrape()?;
    let (mut api, mut metrics, mut recovery) = (Vec::new(), Vec::new(), Vec::new());
    let (mut api_missed, mut metrics_missed) = (0, 0);
    for i in 1..=args.changes {
        // A random pause, so changes do not fall in step with the daemon's timers.
        harness::sleep(Duration::from_millis(rng.below(200) as u64))?;
        let tmp = store.join(".ca-bundle.pem.new");
        fs::write(&tmp, harness::bundle(&cas, &version(i)))
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &bundle).context("renaming the new version over the bundle")?;
        let changed = Instant::now();
        let (mut seen_api, mut seen_metrics) = (None, None);
        loop {
            harness::check_interrupt()?;
            if seen_api.is_none() && verdict_of(&daemon, reader)?.as_deref() == Some("stale") {
                seen_api = Some(changed.elapsed());
            }
            if seen_metrics.is_none() && in_metrics(&daemon)? {
                seen_metrics = Some(changed.elapsed());
            }
            if (seen_api.is_some() && seen_metrics.is_some()) || changed.elapsed() > timeout {
                break;
            }
            std::thread::sleep(every);
        }
        match seen_api {
            Some(d) => api.push(d.as_secs_f64()),
            None => api_missed += 1,
        }
        match seen_metrics {
            Some(d) => metrics.push(d.as_secs_f64()),
            None => metrics_missed += 1,
        }
        // Back to fresh before the next change: the reader reloads.
        fleet.reread(reader)?;
        match time_until(every, settle, || fresh(&daemon))? {
            Some(d) => recovery.push(d.as_secs_f64()),
            None => bail!(
                "the reader stayed stale 30 s after re-reading (change {i}): {:?}",
                daemon.api().process(reader)?
            ),
        }
        if i % 50 == 0 {
            eprintln!("xtask: {i} changes");
        }
    }
    let after = daemon.scrape()?;
    let lost = harness::lost_between(&before, &after);
    fleet.replies()?;
    drop(fleet);
    daemon.stop()?;

    let timeout_s = timeout.as_secs_f64();
    // A missed change counts as the timeout: it must weigh on the percentiles.
    api.extend(std::iter::repeat_n(timeout_s, api_missed));
    metrics.extend(std::iter::repeat_n(timeout_s, metrics_missed));
    for v in [&mut api, &mut metrics, &mut recovery] {
        v.sort_by(f64::total_cmp);
    }
    let row = |name: &str, v: &[f64], missed: usize| -> String {
        let ms = |p: f64| percentile(v, p) * 1000.0;
        format!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {missed} |\n",
            v.len(),
            ms(50.0),
            ms(90.0),
            ms(99.0),
            v.last().copied().unwrap_or(f64::NAN) * 1000.0,
        )
    };
    let mut s = format!(
        "{} changes of a watched CA bundle (`--prefix` on a temp dir, default configuration \
         otherwise), each an atomic rename of a new version (3 of {POOL} CAs), after a random \
         0-200 ms pause; one live reader (a forked process that read the bundle and then \
         blocks) holds it. Measured from the rename to `GET /processes/{{pid}}` saying \
         `stale`, and to the reader's group appearing in `trustdrift_stale_processes`, both \
         polled every {} ms (so figures are up to one poll plus one request late). Between \
         changes the reader re-reads and the next change waits until the daemon calls it \
         fresh again and its group is gone (\"re-read to fresh\"). {}.\n\n",
        args.changes,
        args.poll_ms,
        harness::machine()
    );
    s.push_str(
        "| visible in | changes | p50 ms | p90 ms | p99 ms | max ms | not seen within timeout |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    s.push_str(&row("`/processes/{pid}` verdict stale", &api, api_missed));
    s.push_str(&row("`/metrics` stale group", &metrics, metrics_missed));
    s.push_str(&row("re-read to fresh (both)", &recovery, 0));
    s.push('\n');
    let p99 = |v: &[f64]| percentile(v, 99.0);
    s.push_str(&format!(
        "- p99 change to stale in `/processes`: {:.0} ms (target <= 50 ms): {}\n\
         - p99 change to stale in `/metrics`: {:.0} ms (target < 1000 ms): {}\n\
         - p99 re-read to fresh: {:.0} ms (target <= 100 ms): {}\n",
        p99(&api) * 1000.0,
        verdict(p99(&api) <= 0.050 && api_missed == 0),
        p99(&metrics) * 1000.0,
        verdict(p99(&metrics) < 1.0 && metrics_missed == 0),
        p99(&recovery) * 1000.0,
        verdict(p99(&recovery) <= 0.100),
    ));
    if !lost.is_empty() {
        s.push_str(&format!("- losses during the run: {lost:?}\n"));
    }
    print!("{s}");
    if !args.no_write {
        write_section("latency", &s)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}
