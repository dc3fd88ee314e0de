//! `cargo xtask`: the one place that knows how to make a machine ready, build the eBPF
//! object, and run, test and benchmark trustdrift.

mod ebpf;
mod packages;
mod toolchain;
mod workspace;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark trustdrift")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make this machine ready: nightly rust-src, bpf-linker on nightly's LLVM, and the
    /// Debian packages the tests drive. Idempotent.
    Setup,
    /// Build the eBPF object.
    Build,
    /// fmt and clippy for the workspace and the eBPF crate.
    Lint,
}

fn main() {
    if let Err(e) = dispatch() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => toolchain::setup(),
        Cmd::Build => {
            toolchain::ensure()?;
            ebpf::build().map(|_| ())
        }
        Cmd::Lint => lint(),
    }
}

fn lint() -> Result<()> {
    toolchain::ensure()?;
    let object = ebpf::build()?;
    workspace::cargo(&["fmt", "--all", "--check"]).run("cargo fmt --check")?;
    // Default members only: the eBPF crate is linted for its own target below.
    workspace::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("TRUSTDRIFT_EBPF_OBJECT", &object)
        .run("cargo clippy")?;
    ebpf::clippy()
}
