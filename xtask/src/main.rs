//! `cargo xtask`: the one place that knows how to make a machine ready, build the eBPF
//! object, and run and test trustdrift; the benchmarks and the soak (`bench/`) it builds
//! for and then hands over to.

mod ebpf;
mod packages;
mod toolchain;
mod tools;
mod workspace;

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result, bail};
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
    /// Build the eBPF object and the trustdrift binary (release).
    Build,
    /// Build, then run trustdrift (as root) with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, lint, and run every test, the eBPF ones included.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt and clippy for the workspace and the eBPF crate.
    Lint,
    /// Benchmarks; results go to docs/benchmarks.md. `cargo xtask bench --help` lists
    /// them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Ten minutes of churn against one daemon (outside CI): memory flat at the end and
    /// every verdict right. Exits non-zero on any failure.
    #[command(disable_help_flag = true)]
    Soak {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        Cmd::Build => build().map(|_| ()),
        Cmd::Run { args } => {
            let bin = build()?;
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint(),
        Cmd::Bench { args } => bench("bench", &args),
        Cmd::Soak { args } => bench("soak", &args),
    }
}

/// Hands over to the benchmark crate (`bench/`): `trustdrift-bench <command> <args>`
/// replaces this process (so that an interrupt reaches it alone, and it cleans up),
/// against the binary just built. It keeps the debug profile xtask has, which its figures
/// were measured with. Asking for help builds nothing else.
fn bench(command: &str, args: &[String]) -> Result<()> {
    let help = args.first().is_some_and(|a| a == "help")
        || args.iter().any(|a| a == "-h" || a == "--help")
        || (command == "bench" && args.is_empty());
    let trustdrift = if help {
        None
    } else {
        let bin = build()?;
        packages::ensure(&bench_packages(command, args))?;
        Some(bin)
    };
    workspace::cargo(&["build", "--package", "trustdrift-bench"]).run("building the benchmarks")?;
    let bench = workspace::target_dir().join("debug/trustdrift-bench");
    let mut cmd = Command::new(&bench);
    cmd.arg(command).args(args);
    if let Some(bin) = trustdrift {
        cmd.env("TRUSTDRIFT_BIN", bin);
    }
    Err(cmd.exec()).with_context(|| format!("running {}", bench.display()))
}

/// The Debian packages a benchmark drives besides trustdrift: the tools the overhead
/// benchmark compares with.
fn bench_packages(command: &str, args: &[String]) -> Vec<(&'static str, &'static str)> {
    let mut needed = Vec::new();
    if command == "bench" && matches!(args.first().map(String::as_str), Some("overhead" | "probe"))
    {
        needed.extend([("strace", "strace"), ("bpftrace", "bpftrace")]);
        if !args.iter().any(|a| a == "--no-auditd") {
            needed.push(("auditctl", "auditd"));
        }
    }
    needed
}

/// Builds everything a user runs; returns the trustdrift binary.
fn build() -> Result<std::path::PathBuf> {
    toolchain::ensure()?;
    let object = ebpf::build()?;
    workspace::cargo(&["build", "--release", "--package", "trustdrift"])
        .env("TRUSTDRIFT_EBPF_OBJECT", &object)
        .run("building trustdrift")?;
    let bin = workspace::target_dir().join("release/trustdrift");
    if !bin.exists() {
        bail!("cargo reported success but {} is missing", bin.display());
    }
    Ok(bin)
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

fn test(extra: &[String]) -> Result<()> {
    let bin = build()?;
    packages::ensure_for_tests()?;
    let tools = tools::ensure()?;
    lint()?;
    let mut args = vec!["test", "--release"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let mut step = workspace::cargo(&args)
        .env("TRUSTDRIFT_BIN", &bin)
        .env("TRUSTDRIFT_EBPF_OBJECT", ebpf::object_path());
    for (key, path) in tools.env() {
        step = step.env(key, path);
    }
    step.run("cargo test")
}
