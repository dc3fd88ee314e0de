//! trustdrift: catch TLS trust drift. A kernel probe records which process read which
//! trust file and when; the daemon compares that with what is on disk now.

mod api;
mod attribution;
mod catalog;
mod clock;
mod engine;
mod events;
mod kernel_layout;
mod ledger;
mod privileges;
mod probe;
mod procfs;
mod report;
mod resolution;
mod rootfs;
mod seed;
mod store_format;
mod trace;
mod tracefs;
mod trust_paths;
mod verdict;
mod watch;

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    probe::{Capacities, Mode, ProbeOptions, Programs},
    trust_paths::TrustPaths,
};

#[derive(Parser)]
#[command(
    version,
    about = "Catch TLS trust drift: processes that trust what is no longer on disk"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "TRUSTDRIFT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `trustdrift=debug`.
    #[arg(long, global = true, default_value = "info", env = "TRUSTDRIFT_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: follow trust reads, judge each process against the disk, serve the
    /// verdicts over HTTP.
    Run(RunArgs),
    /// Print live trust-file accesses: who opened and read which trust file, and when.
    Trace(TraceArgs),
    /// Attach the probe (or the empty floor programs) and wait for SIGINT/SIGTERM.
    /// Used by `cargo xtask bench`.
    #[command(hide = true)]
    Attach(AttachArgs),
}

#[derive(Args)]
struct FilterArgs {
    /// Also treat paths under this prefix as trust material (repeatable).
    #[arg(long = "prefix", value_name = "PATH")]
    prefixes: Vec<String>,
    /// Also treat paths ending with this suffix as trust material (repeatable).
    #[arg(long = "suffix", value_name = "SUFFIX")]
    suffixes: Vec<String>,
    /// Never treat paths under this prefix as trust material (repeatable).
    #[arg(long = "exclude", value_name = "PATH")]
    excludes: Vec<String>,
    /// Start from an empty filter instead of the built-in store locations.
    #[arg(long)]
    no_default_paths: bool,
    /// `full` follows opens and reads; `lean` follows opens only, at lower cost.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    mode: Mode,
}

impl FilterArgs {
    fn paths(&self) -> TrustPaths {
        let mut paths = if self.no_default_paths {
            TrustPaths {
                prefixes: vec![],
                suffixes: vec![],
                excludes: vec![],
            }
        } else {
            TrustPaths::defaults()
        };
        paths.prefixes.extend(self.prefixes.iter().cloned());
        paths.suffixes.extend(self.suffixes.iter().cloned());
        paths.excludes.extend(self.excludes.iter().cloned());
        paths
    }
}

#[derive(Args)]
struct TraceArgs {
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// How often aggregated reads are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    #[command(flatten)]
    filter: FilterArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:9477")]
    listen: std::net::SocketAddr,
    /// Largest trust file read and parsed, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_file_bytes: u64,
    /// How long an exited process stays listed, in seconds.
    #[arg(long, default_value_t = 300)]
    exit_grace_secs: u64,
    /// How often every trust file is re-checked behind inotify, in seconds.
    #[arg(long, default_value_t = 30)]
    rescan_secs: u64,
    /// How often stale processes' kernel aggregates are polled for re-reads, in ms.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    #[command(flatten)]
    filter: FilterArgs,
}

#[derive(Args)]
struct AttachArgs {
    /// Attach empty programs on the same hooks instead of the probe.
    #[arg(long)]
    floor: bool,
    /// On exit, print each program's kernel run time and count as JSON lines.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    filter: FilterArgs,
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn attach(args: AttachArgs) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let probe = probe::Probe::attach(ProbeOptions {
        mode: args.filter.mode,
        programs: if args.floor {
            Programs::Floor
        } else {
            Programs::Probe
        },
        paths: args.filter.paths(),
        capacities: Capacities::default(),
    })?;
    println!("attached");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if args.stats {
        for stats in probe.program_stats() {
            println!("{}", serde_json::to_string(&stats)?);
        }
    }
    drop(probe);
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    // Bind before attaching: a port in use is reported at once, not after the probe.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    let paths = args.filter.paths();
    let options = engine::EngineOptions {
        probe: ProbeOptions {
            mode: args.filter.mode,
            programs: Programs::Probe,
            paths: paths.clone(),
            capacities: Capacities::default(),
        },
        catalog: catalog::Limits {
            max_file_bytes: args.max_file_bytes,
            ..catalog::Limits::default()
        },
        ledger: ledger::LedgerLimits {
            exit_grace: Duration::from_secs(args.exit_grace_secs),
            ..ledger::LedgerLimits::default()
        },
        max_watches: 8192,
        rescan: Duration::from_secs(args.rescan_secs.max(1)),
        poll: Duration::from_millis(args.poll_ms.max(10)),
    };
    engine::run(options, paths, move |rx| api::serve(listener, rx)).await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let mut cli = Cli::parse();
    if cli.command.is_none() {
        // No subcommand: trace with defaults (global flags still apply).
        cli = Cli::parse_from(std::env::args_os().chain(["trace".into()]));
    }
    init_logging(cli.log_format, &cli.log);
    let Some(command) = cli.command else {
        unreachable!("a subcommand was just supplied");
    };
    let result = match command {
        Command::Trace(args) => {
            trace::run(trace::TraceOptions {
                probe: ProbeOptions {
                    mode: args.filter.mode,
                    programs: Programs::Probe,
                    paths: args.filter.paths(),
                    capacities: Capacities::default(),
                },
                format: if args.json {
                    trace::Format::Json
                } else {
                    trace::Format::Table
                },
                interval: Duration::from_millis(args.interval_ms.max(10)),
            })
            .await
        }
        Command::Attach(args) => attach(args).await,
        Command::Run(args) => run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trustdrift: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
