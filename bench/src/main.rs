//! The benchmarks and the soak, against the trustdrift binary in `TRUSTDRIFT_BIN`. Run
//! them as `cargo xtask bench …` and `cargo xtask soak`, which build the probe and the
//! binary first; `workload` is what the overhead benchmark forks.

mod bench;
mod harness;
mod soak;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
#[command(about = "Benchmark trustdrift, and soak it")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks; results go to docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Ten minutes of churn against one daemon (outside CI): memory flat at the end and
    /// every verdict right. Exits non-zero on any failure.
    Soak(soak::Args),
    #[command(hide = true)]
    Workload(bench::WorkloadArgs),
}

fn main() {
    if let Err(e) = dispatch() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bench { which } => bench::run(which, &trustdrift_testkit::trustdrift_bin()),
        Cmd::Soak(args) => soak::run(&args, &trustdrift_testkit::trustdrift_bin()),
        Cmd::Workload(args) => bench::workload(&args),
    }
}
