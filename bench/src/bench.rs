//! Benchmarks as A/B comparisons in one run on one machine: every variant is measured in
//! every round, interleaved, and reported as medians and ratios. Targets live here, not
//! in timed tests; each benchmark writes its section of docs/benchmarks.md.

use std::{fs, io::Write, path::Path};

use anyhow::{Result, bail};
use clap::Subcommand;

mod footprint;
mod latency;
mod overhead;
mod startup;
mod storm;
mod throughput;

pub use overhead::{WorkloadArgs, workload};

#[derive(Subcommand)]
pub enum Which {
    /// Cost on unrelated work (an open+read+close loop, and reading every file of a
    /// tree): nothing attached, the floor of trustdrift's hooks, trustdrift full and
    /// lean, an equivalent bpftrace script, and auditd read watches.
    #[command(alias = "probe")]
    Overhead(overhead::Args),
    /// Storms of processes reading trust files: matched opens per second handled with
    /// zero loss, and the loss curve past that.
    Throughput(throughput::Args),
    /// A paced storm held for minutes with default capacities: cost per record over
    /// time, losses, and memory back to idle after the storm's processes leave.
    Storm(storm::Args),
    /// Store change to stale verdict in /processes and /metrics: p50 and p99.
    Latency(latency::Args),
    /// The daemon's RSS and CPU at idle and with 1,000 and 10,000 live readers.
    Footprint(footprint::Args),
    /// Time to /readyz with 0 to 10,000 extra idle processes on the node: the start-up
    /// scan through /proc against the probe's task iterators.
    Startup(startup::Args),
}

pub fn run(which: Which, trustdrift: &Path) -> Result<()> {
    match which {
        Which::Overhead(args) => overhead::run(&args, trustdrift),
        Which::Throughput(args) => throughput::run(&args, trustdrift),
        Which::Storm(args) => storm::run(&args, trustdrift),
        Which::Latency(args) => latency::run(&args, trustdrift),
        Which::Footprint(args) => footprint::run(&args, trustdrift),
        Which::Startup(args) => startup::run(&args, trustdrift),
    }
}

pub(crate) fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// Replaces the section `name` of docs/benchmarks.md (between markers), keeping the rest.
pub(crate) fn write_section(name: &str, body: &str) -> Result<()> {
    let path = trustdrift_testkit::repo().join("docs/benchmarks.md");
    let existing = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let block = format!("{start}\n{body}{end}");
    let updated = match (existing.find(&start), existing.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{}{}", &existing[..a], block, &existing[b + end.len()..])
        }
        _ => format!("{}\n{block}\n", existing.trim_end()),
    };
    let mut f = fs::File::create(&path)?;
    f.write_all(updated.as_bytes())?;
    Ok(())
}
