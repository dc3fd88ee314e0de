//! trustdrift: catch TLS trust drift. A kernel probe records which process read which
//! trust file and when; the daemon compares that with what is on disk now.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

use trustdrift::{
    cli::client,
    cli::trace,
    config::{self, Config, Override},
    engine,
    probe::{self, Capacities, Mode, ProbeOptions, Programs, Shares},
    serve::api,
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
    /// List processes with trust reads, from the running daemon.
    Processes(ProcessesArgs),
    /// Explain the verdict on one process, in words, from the running daemon.
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

#[derive(Args)]
struct ProcessesArgs {
    /// The API's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only processes with this verdict: fresh, stale, expired_in_memory, unverified.
    #[arg(long)]
    verdict: Option<String>,
    /// The daemon's API address (default: the first of api.listen).
    #[arg(long)]
    api: Option<String>,
}

#[derive(Args)]
struct ExplainArgs {
    pid: u32,
    /// The daemon's API address (default: the first of api.listen).
    #[arg(long)]
    api: Option<String>,
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
        lifetime: timeout * 10,
    };
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
        let router = api::router(rx, liveness, concurrency, timeout, Arc::clone(&refusals));
        api::serve(bound, router, connections, refusals)
    })
    .await
}

async fn attach(args: AttachArgs, config: &Config) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let programs = if args.floor {
        Programs::Floor
    } else {
        Programs::Probe
    };
    let probe = probe::Probe::attach(probe_options(config, programs))?;
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
                return ExitCode::from(2);
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
            return ExitCode::from(2);
        }
    };
    let log = init_logging(&config);
    let result = match command {
        Command::Run(_) => run(config, flags, log).await,
        Command::Processes(args) => api_address(&config, args.api.as_ref()).and_then(|api| {
            let path = match &args.verdict {
                Some(v) => format!("/processes?verdict={v}"),
                None => "/processes".to_owned(),
            };
            let body = client::get(&api, &path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                println!("{}", client::table(&body));
            }
            Ok(())
        }),
        Command::Explain(args) => api_address(&config, args.api.as_ref()).and_then(|api| {
            let body = client::get(&api, &format!("/processes/{}", args.pid))?;
            println!("{}", client::explain(&body));
            Ok(())
        }),
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
