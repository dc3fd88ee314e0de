//! trustdrift: catch TLS trust drift. A kernel probe records which process read which
//! trust file and when; the daemon compares that with what is on disk now.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

use trustdrift::{
    cli::client,
    cli::trace,
    config::{self, Config, Override},
    engine,
    probe::{self, Capacities, Mode, ProbeOptions, Programs, Shares, iterators::SeedSource},
    serve::{api, stream::InFlight},
};

#[derive(Parser)]
#[command(
    version,
    about = "Catch TLS trust drift: processes that trust what is no longer on disk",
    after_help = "Configuration: built-in defaults < the TOML file (--config, default \
                  /etc/trustdrift/config.toml if present) < TRUSTDRIFT_<SECTION>_<KEY> \
                  environment variables < flags (--set section.key=value for any key).\n\
                  `trustdrift config` prints the effective configuration."
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "TRUSTDRIFT_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Override any configuration key, e.g. --set catalog.rescan_interval=10s (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log format on stderr: human or json (log.format).
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Log filter, e.g. `info` or `trustdrift=debug` (log.level).
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default): follow trust reads, judge each process against the
    /// disk, serve verdicts and metrics over HTTP.
    Run(RunArgs),
    /// What needs a restart now: live processes with trust reads, worst first, from the
    /// running daemon. Exits 0, 1 (stale), 2 (expired in memory, or expiring within a day)
    /// or 3 (no answer).
    #[command(after_help = EXIT_STATUS)]
    Processes(ProcessesArgs),
    /// Explain the verdict on one process, in words, from the running daemon. Exits as
    /// `processes` does, for that process.
    #[command(after_help = EXIT_STATUS)]
    Explain(ExplainArgs),
    /// Print live trust-file accesses: who opened and read which trust file, and when.
    Trace(TraceArgs),
    /// Print the effective configuration (defaults, file, environment and flags merged).
    Config,
    /// Attach the probe (or the empty floor programs) and wait for SIGINT/SIGTERM.
    /// Used by `cargo xtask bench`.
    #[command(hide = true)]
    Attach(AttachArgs),
}

#[derive(Args, Default)]
struct FilterArgs {
    /// Also treat paths under this prefix as trust material (repeatable; adds to
    /// paths.prefixes).
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
    /// `full` follows opens and reads; `lean` follows opens only, at lower cost
    /// (probe.mode).
    #[arg(long)]
    mode: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Where the API listens: host:port and/or unix:/path, comma-separated (api.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Where the ledger is persisted; "" disables persistence (state.dir).
    #[arg(long)]
    state_dir: Option<String>,
    /// bpffs directory for the pinned probe; "" disables pinning (state.pin_dir).
    #[arg(long)]
    pin_dir: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
}

/// The exit status of the API's clients, for `--help` (README has it too).
const EXIT_STATUS: &str = "\
Exit status (as Nagios plugins, for scripts and node checks; exited processes never count):
  0  nothing listed needs a restart (fresh, or unverified only)
  1  a live process listed is stale
  2  a live process listed holds an expired certificate whose renewal is on disk
     (expired_in_memory), or one whose renewal is on disk that expires within 24 hours
  3  no answer: the daemon cannot be reached or refused the request, or the command line
     or configuration is wrong

Columns: STALE FOR is how long since its first file drifted; EXPIRES is when the earliest
certificate it holds whose renewal is on disk expires (\"3h ago\" once expired).";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// One line per process, worst first.
    Table,
    /// The table with the uid, origin, exact times, executable and drifted paths.
    Wide,
    /// The API's JSON (an array, as `GET /processes` returns it).
    Json,
}

#[derive(Args)]
struct ProcessesArgs {
    /// Also list processes that exited (kept for ledger.exit_grace with the verdict they
    /// had); they never change the exit status.
    #[arg(long)]
    all: bool,
    /// Only processes with this verdict: fresh, stale, expired_in_memory, unverified.
    #[arg(long)]
    verdict: Option<String>,
    /// Only processes in this Kubernetes namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only processes of this pod (its name).
    #[arg(long)]
    pod: Option<String>,
    /// Only processes of this container: its name, or a container id prefix (4+ characters).
    #[arg(long)]
    container: Option<String>,
    /// Only processes with this command name (comm).
    #[arg(long)]
    comm: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Same as `-o json` (kept for scripts written before -o).
    #[arg(long, hide = true)]
    json: bool,
    /// The daemon's API address (default: the first of api.listen).
    #[arg(long)]
    api: Option<String>,
}

#[derive(Args)]
struct ExplainArgs {
    pid: u32,
    /// Every certificate of long lists (missing and removed CAs), not the first few.
    #[arg(long)]
    all: bool,
    /// The daemon's API address (default: the first of api.listen).
    #[arg(long)]
    api: Option<String>,
}

/// `processes`: prints what the daemon lists and says what it calls for.
fn processes(config: &Config, args: &ProcessesArgs) -> Result<client::Status> {
    let api = api_address(config, args.api.as_ref())?;
    let query = client::Query {
        all: args.all,
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
        container: args.container.clone(),
        comm: args.comm.clone(),
        verdict: args.verdict.clone(),
    };
    let body = client::get(&api, &query.path())?;
    let now = std::time::SystemTime::now();
    let output = if args.json { Output::Json } else { args.output };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
        _ if body.as_array().is_some_and(Vec::is_empty) => {
            eprintln!("No processes with trust reads match.")
        }
        Output::Table => println!("{}", client::table(&body, now, false)),
        Output::Wide => println!("{}", client::table(&body, now, true)),
    }
    Ok(client::status(&body, now))
}

/// `explain`: the verdict on one process in words, and what it calls for.
fn explain(config: &Config, args: &ExplainArgs) -> Result<client::Status> {
    let api = api_address(config, args.api.as_ref())?;
    let body = client::get(&api, &format!("/processes/{}", args.pid))?;
    let now = std::time::SystemTime::now();
    println!("{}", client::explain(&body, now, args.all));
    Ok(client::status_of(&body, now))
}

/// Whether the command line asks for one of the API's clients, whose exit statuses are
/// the Nagios scale: their usage and configuration errors are 3 (UNKNOWN), never 2.
fn asks_a_client() -> bool {
    use clap::CommandFactory;
    Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(std::env::args_os())
        .ok()
        .and_then(|m| m.subcommand_name().map(str::to_owned))
        .is_some_and(|name| name == "processes" || name == "explain")
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
struct AttachArgs {
    /// Attach empty programs on the same hooks instead of the probe.
    #[arg(long)]
    floor: bool,
    /// Attach programs that only copy the path of each read-only open, on the same hooks.
    #[arg(long, conflicts_with = "floor")]
    copy_floor: bool,
    /// On exit, print each program's kernel run time and count as JSON lines.
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    filter: FilterArgs,
}

/// Everything the command line says about the configuration, re-applied on reload.
struct FlagOverrides {
    file: Option<PathBuf>,
    scalars: Vec<Override>,
    filter: FilterArgs,
}

impl FlagOverrides {
    fn load(&self) -> Result<Config, config::ConfigError> {
        let mut all = config::env_overrides(std::env::vars());
        all.extend(self.scalars.iter().cloned());
        let mut c = Config::load(self.file.as_deref(), &all)?;
        let f = &self.filter;
        if f.no_default_paths {
            c.paths.defaults = false;
        }
        c.paths.prefixes.extend(f.prefixes.iter().cloned());
        c.paths.suffixes.extend(f.suffixes.iter().cloned());
        c.paths.excludes.extend(f.excludes.iter().cloned());
        c.check("command-line flags")?;
        Ok(c)
    }
}

fn flag(origin: &str, key: &str, value: Option<&String>) -> Option<Override> {
    value.map(|v| Override {
        origin: origin.to_owned(),
        key: key.to_owned(),
        value: v.clone(),
    })
}

fn init_logging(config: &Config) -> reload::Handle<EnvFilter, tracing_subscriber::Registry> {
    let filter = EnvFilter::try_new(&config.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let json = config.log.format == "json";
    let human_layer = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json_layer = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(human_layer)
        .with(json_layer)
        .init();
    handle
}

fn probe_options(config: &Config, programs: Programs) -> ProbeOptions {
    ProbeOptions {
        mode: if config.probe.mode == "lean" {
            Mode::Lean
        } else {
            Mode::Full
        },
        programs,
        paths: config.trust_paths(),
        capacities: Capacities::default(),
        shares: Shares::default(),
        pin_dir: None,
        bpf_stats: false,
        // Nothing here scans running processes.
        seed: SeedSource::Procfs,
    }
}

fn api_address(config: &Config, flag: Option<&String>) -> Result<config::Listen> {
    match flag {
        Some(a) => a.parse().map_err(|e| anyhow::anyhow!("--api {a:?}: {e}")),
        None => config
            .listen()
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("api.listen names no address")),
    }
}

async fn run(
    config: Config,
    flags: FlagOverrides,
    log: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
) -> Result<()> {
    // Bind before attaching: a port in use is reported at once, not after the probe.
    let mut bound = Vec::new();
    for listen in config.listen().map_err(|e| anyhow::anyhow!(e))? {
        bound.push(api::bind(&listen)?);
    }
    let timeout = Config::duration_of(&config.api.request_timeout);
    let liveness = Config::duration_of(&config.api.liveness_timeout);
    let concurrency = config.api.max_concurrent_requests;
    let connections = api::ConnectionLimits {
        max: config.api.max_connections,
        header_timeout: timeout,
        write_stall: timeout,
        lifetime: timeout * 10,
    };
    let in_flight = InFlight::new(config.api.max_bytes_in_flight);
    let refusals = Arc::new(api::Refusals::default());
    let reload = move || {
        let new = flags.load()?;
        if let Ok(filter) = EnvFilter::try_new(&new.log.level) {
            let _ = log.modify(|f| *f = filter);
        }
        Ok(new)
    };
    engine::run(config, reload, move |rx, heartbeat| {
        let liveness = api::Liveness {
            heartbeat,
            timeout: liveness,
        };
        let router = api::router(
            rx,
            liveness,
            concurrency,
            timeout,
            Arc::clone(&refusals),
            in_flight,
        );
        api::serve(bound, router, connections, refusals)
    })
    .await
}

async fn attach(args: AttachArgs, config: &Config) -> Result<()> {
    // Both handlers exist before "attached" is printed: whoever reads it may signal at
    // once, and a SIGINT before the handler would kill the process without its stats.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let programs = if args.floor {
        Programs::Floor
    } else if args.copy_floor {
        Programs::CopyFloor
    } else {
        Programs::Probe
    };
    let probe = probe::Probe::attach(probe_options(config, programs))?;
    println!("attached");
    tokio::select! {
        _ = interrupt.recv() => {}
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() && asks_a_client() {
                return ExitCode::from(client::Status::Unknown.code());
            }
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let client_command = matches!(
        cli.command,
        Some(Command::Processes(_) | Command::Explain(_))
    );
    let usage_error = if client_command {
        client::Status::Unknown.code()
    } else {
        2
    };
    let command = cli.command.unwrap_or(Command::Run(RunArgs {
        listen: None,
        state_dir: None,
        pin_dir: None,
        filter: FilterArgs::default(),
    }));
    let mut scalars: Vec<Override> = Vec::new();
    for s in &cli.set {
        match config::parse_set(s) {
            Ok(o) => scalars.push(o),
            Err(e) => {
                eprintln!("trustdrift: {e}");
                return ExitCode::from(usage_error);
            }
        }
    }
    scalars.extend(flag("--log-format", "log.format", cli.log_format.as_ref()));
    scalars.extend(flag("--log", "log.level", cli.log.as_ref()));
    let filter = match &command {
        Command::Run(a) => {
            scalars.extend(flag("--listen", "api.listen", a.listen.as_ref()));
            scalars.extend(flag("--state-dir", "state.dir", a.state_dir.as_ref()));
            scalars.extend(flag("--pin-dir", "state.pin_dir", a.pin_dir.as_ref()));
            Some(&a.filter)
        }
        Command::Trace(a) => Some(&a.filter),
        Command::Attach(a) => Some(&a.filter),
        _ => None,
    };
    if let Some(f) = filter {
        scalars.extend(flag("--mode", "probe.mode", f.mode.as_ref()));
    }
    let flags = FlagOverrides {
        file: cli.config.clone(),
        scalars,
        filter: filter
            .map(|f| FilterArgs {
                prefixes: f.prefixes.clone(),
                suffixes: f.suffixes.clone(),
                excludes: f.excludes.clone(),
                no_default_paths: f.no_default_paths,
                mode: None,
            })
            .unwrap_or_default(),
    };
    let config = match flags.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trustdrift: {e}");
            return ExitCode::from(usage_error);
        }
    };
    let log = init_logging(&config);
    let client_result = match &command {
        Command::Processes(args) => Some(processes(&config, args)),
        Command::Explain(args) => Some(explain(&config, args)),
        _ => None,
    };
    if let Some(result) = client_result {
        return match result {
            Ok(status) => ExitCode::from(status.code()),
            Err(e) => {
                eprintln!("trustdrift: {e:#}");
                ExitCode::from(client::Status::Unknown.code())
            }
        };
    }
    let result = match command {
        Command::Run(_) => run(config, flags, log).await,
        Command::Processes(_) | Command::Explain(_) => unreachable!("answered above"),
        Command::Config => {
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Trace(args) => {
            trace::run(trace::TraceOptions {
                probe: probe_options(&config, Programs::Probe),
                format: if args.json {
                    trace::Format::Json
                } else {
                    trace::Format::Table
                },
                interval: Duration::from_millis(args.interval_ms.max(10)),
            })
            .await
        }
        Command::Attach(args) => attach(args, &config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trustdrift: {e:#}");
            ExitCode::FAILURE
        }
    }
}
