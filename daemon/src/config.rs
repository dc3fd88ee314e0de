//! Configuration: built-in defaults, then a TOML file, then `TRUSTDRIFT_*` environment
//! variables, then command-line flags, each overriding the one before. Every key has one
//! name in all three forms: `catalog.max_file_bytes` in the file,
//! `TRUSTDRIFT_CATALOG_MAX_FILE_BYTES` in the environment, and
//! `--set catalog.max_file_bytes=...` on the command line (common keys also have their own
//! flags, like `--listen`). A bad key or value is an error that names both; it never
//! panics and never falls back silently.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::probe::trust_paths::{TrustPathError, TrustPaths};

/// Where the file is looked for when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/trustdrift/config.toml";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{origin}: unknown key `{key}`")]
    UnknownKey { origin: String, key: String },
    #[error("{origin}: key `{key}`: value {value:?} is invalid: {reason}")]
    Value {
        origin: String,
        key: String,
        value: String,
        reason: String,
    },
}

/// Where the API listens: TCP, or a unix socket (`unix:/run/trustdrift/api.sock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err("a unix socket path must be absolute (unix:/run/...)".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| "expected host:port (e.g. 127.0.0.1:9477) or unix:/path".into())
    }
}

/// The whole configuration, with every default filled in.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub api: Api,
    pub probe: Probe,
    pub paths: Paths,
    pub catalog: Catalog,
    pub ledger: Ledger,
    pub state: State,
    pub metrics: Metrics,
    pub log: Log,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// `host:port` or `unix:/path`.
    pub listen: String,
    pub request_timeout: String,
    /// `/healthz` fails when the engine has made no progress for this long (a liveness
    /// probe then restarts a daemon stuck where no deadline reaches).
    pub liveness_timeout: String,
    pub max_concurrent_requests: usize,
    /// Open connections at once; more are closed as they arrive (slow clients must not
    /// use up the daemon's file descriptors).
    pub max_connections: usize,
    /// Bytes of answers written and not yet read by their clients, across connections:
    /// large answers are written as clients read them, and wait past this.
    pub max_bytes_in_flight: usize,
    /// Show processes' command lines in the API (they can hold secrets: tokens, passwords
    /// passed as arguments). Off: they are not even recorded.
    pub cmdline: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Probe {
    /// `full` (opens and reads) or `lean` (opens only).
    pub mode: String,
    /// How the start-up scan learns what running processes hold: `auto` (BPF task
    /// iterators where the kernel allows them, else /proc) or `procfs`.
    pub seed: String,
    pub max_accesses: u32,
    pub max_fds: u32,
    pub max_processes: u32,
    pub ring_buffer_bytes: u32,
    /// Distinct trust paths one process image may open and have recorded; past it the
    /// probe counts `process_quota` (a process opening thousands of `.pem` files is a
    /// flood, not a TLS client).
    pub max_paths_per_process: u32,
    /// Percent of each kernel table one cgroup (a container) may hold; a uid within a
    /// cgroup gets half of it, a non-root uid across cgroups twice it. Past it the probe
    /// counts `owner_quota`: one workload cannot fill the tables and blind the node.
    pub owner_share: u32,
    /// Records taken out of the ring buffer and waiting for the engine, at most this many
    /// bytes; beyond it the ring buffer fills and the probe counts `ringbuf_full`.
    pub queue_bytes: u64,
    /// How much the daemon raises its scheduling priority (nice -N), as auditd's
    /// `priority_boost` does, so that a storm of new processes does not starve the
    /// threads that take in what the probe sends. 0 leaves it alone.
    pub priority_boost: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// Keep the built-in store locations and certificate suffixes.
    pub defaults: bool,
    pub prefixes: Vec<String>,
    pub suffixes: Vec<String>,
    pub excludes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Catalog {
    /// Largest trust file read; bigger ones are reported, not parsed.
    pub max_file_bytes: u64,
    /// Certificates read from one file; past it the rest are counted
    /// (`catalog_certificates_dropped`), not parsed.
    pub max_certificates_per_file: usize,
    /// Memory parsed certificates may hold in all, in bytes; past it new content is known
    /// by its digest only, not parsed, and counted (`catalog_contents_unparsed`).
    pub max_content_bytes: u64,
    pub rescan_interval: String,
    pub max_files: usize,
    /// The longest one read in a process's world may take (a FIFO, a FUSE file that never
    /// answers, a hung NFS mount); past it the read is given up, counted
    /// (`trustdrift_scan_errors_total{reason="timeout"}`) and retried after a back-off.
    pub io_timeout: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ledger {
    pub exit_grace: String,
    /// Processes listed, live and exited within the grace. A storm of short-lived
    /// processes fills it (exited ones make room first, counted): about 6.5 KiB each
    /// with four reads, which the deployed memory limit must hold.
    pub max_processes: usize,
    pub poll_interval: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    /// Where the ledger is persisted; empty disables persistence.
    pub dir: String,
    /// bpffs directory for the probe's pinned maps and links; empty disables pinning.
    pub pin_dir: String,
    pub save_interval: String,
    /// Room of the crash journal, in bytes: records taken from the ring buffer (and
    /// aggregates taken from the kernel) since the last save, so a SIGKILL loses none.
    pub journal_bytes: u64,
    /// Where the crash journal lives; empty: in `dir`. The intake writes every record
    /// there before the ring buffer gets its room back, through a shared mapping whose
    /// page faults on a disk can wait for the file system's own journal: a tmpfs (`/run`,
    /// cleared at boot like the journal's records) keeps a disk's stall off the intake.
    pub journal_dir: String,
    /// Detach the probe on exit instead of leaving it pinned for the next start.
    pub unpin_on_exit: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Export per-process series with `pid` and `exe` labels (unbounded: opt-in).
    pub per_process: bool,
    /// Export store series for trust files inside containers too (`root` label).
    pub container_stores: bool,
    /// Turn on the kernel's per-program run-time accounting (costs ~20 ns per hook).
    pub bpf_stats: bool,
    /// A `node` label on every series (the DaemonSet sets it from the downward API's
    /// `spec.nodeName` through `TRUSTDRIFT_METRICS_NODE`); empty: no such label.
    pub node: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `human` or `json`.
    pub format: String,
    /// tracing filter, e.g. `info` or `trustdrift=debug`.
    pub level: String,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9477".into(),
            request_timeout: "10s".into(),
            liveness_timeout: "30s".into(),
            max_concurrent_requests: 64,
            max_connections: 512,
            max_bytes_in_flight: 16 << 20,
            cmdline: false,
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            mode: "full".into(),
            seed: "auto".into(),
            max_accesses: 65536,
            max_fds: 16384,
            max_processes: 16384,
            ring_buffer_bytes: 1 << 20,
            max_paths_per_process: 256,
            owner_share: 25,
            queue_bytes: 32 << 20,
            priority_boost: 5,
        }
    }
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            defaults: true,
            prefixes: vec![],
            suffixes: vec![],
            excludes: vec![],
        }
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 << 20,
            max_certificates_per_file: 4096,
            max_content_bytes: 64 << 20,
            rescan_interval: "30s".into(),
            max_files: 16384,
            io_timeout: "2s".into(),
        }
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            exit_grace: "5m".into(),
            max_processes: 32768,
            poll_interval: "250ms".into(),
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: "/var/lib/trustdrift".into(),
            pin_dir: "/sys/fs/bpf/trustdrift".into(),
            save_interval: "2s".into(),
            journal_bytes: 64 << 20,
            journal_dir: String::new(),
            unpin_on_exit: false,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

/// One `key=value` override, from the environment or a flag.
#[derive(Clone, Debug)]
pub struct Override {
    /// Where it came from, for error messages (`TRUSTDRIFT_API_LISTEN`, `--set`).
    pub origin: String,
    /// Dotted key, e.g. `api.listen`.
    pub key: String,
    pub value: String,
}

/// `TRUSTDRIFT_SECTION_KEY=value` → `section.key`; variables that are not config keys
/// (`TRUSTDRIFT_LOG_FORMAT` is one, `TRUSTDRIFT_BIN` is not) are reported by `apply`.
pub fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Vec<Override> {
    let sections = [
        "api", "probe", "paths", "catalog", "ledger", "state", "metrics", "log",
    ];
    vars.filter_map(|(name, value)| {
        let rest = name.strip_prefix("TRUSTDRIFT_")?.to_ascii_lowercase();
        let section = sections
            .iter()
            .find(|s| rest.starts_with(&format!("{s}_")))?;
        Some(Override {
            origin: format!("environment variable {name}"),
            key: format!("{section}.{}", &rest[section.len() + 1..]),
            value,
        })
    })
    .collect()
}

/// Parses `section.key=value` as given to `--set`.
pub fn parse_set(arg: &str) -> Result<Override, String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("--set {arg:?}: expected section.key=value"))?;
    Ok(Override {
        origin: "--set".into(),
        key: key.trim().replace('-', "_"),
        value: value.to_owned(),
    })
}

/// A value as TOML sees it: numbers and booleans as such, lists as comma-separated
/// strings, anything else as a string.
fn toml_value(raw: &str, current: Option<&toml::Value>) -> toml::Value {
    match current {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .unwrap_or_else(|_| toml::Value::String(raw.to_owned())),
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => toml::Value::String(raw.to_owned()),
        },
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn serde_reason(e: impl fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

impl Config {
    /// Loads the file (a missing default file is fine, a missing explicit one is not),
    /// applies the overrides in order, and validates.
    pub fn load(file: Option<&Path>, overrides: &[Override]) -> Result<Self, ConfigError> {
        let (path, required) = match file {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let mut doc = match fs::read_to_string(&path) {
            Ok(text) => text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.display().to_string(),
                    message: e.to_string().trim().to_owned(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => toml::Table::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let origin = format!("config file {}", path.display());
        // Check the file alone first, so an error names the file rather than an override.
        let config = Self::from_table(&doc, &origin)?;
        let defaults = toml::Table::try_from(&config).unwrap_or_default();
        for o in overrides {
            let Some((section, key)) = o.key.split_once('.') else {
                return Err(ConfigError::UnknownKey {
                    origin: o.origin.clone(),
                    key: o.key.clone(),
                });
            };
            let current = defaults
                .get(section)
                .and_then(|s| s.as_table())
                .and_then(|t| t.get(key));
            if current.is_none() {
                return Err(ConfigError::UnknownKey {
                    origin: o.origin.clone(),
                    key: o.key.clone(),
                });
            }
            let table = doc
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = table {
                t.insert(key.to_owned(), toml_value(&o.value, current));
            }
            Self::from_table(&doc, &o.origin).map_err(|e| match e {
                ConfigError::Value { key, reason, .. } => ConfigError::Value {
                    origin: o.origin.clone(),
                    key,
                    value: o.value.clone(),
                    reason,
                },
                other => other,
            })?;
        }
        Self::from_table(&doc, &origin)
    }

    /// A configuration file's text alone, validated (what `load` does before overrides).
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        let doc = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string().trim().to_owned(),
            })?;
        Self::from_table(&doc, &format!("config file {path}"))
    }

    fn from_table(doc: &toml::Table, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::Value::Table(doc.clone())
            .try_into()
            .map_err(|e: toml::de::Error| Self::explain(doc, origin, e))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Turns a deserialisation error into one naming the key and the value.
    fn explain(doc: &toml::Table, origin: &str, e: toml::de::Error) -> ConfigError {
        let message = e.message().to_owned();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let field = rest.split('`').next().unwrap_or_default();
            let section = doc
                .iter()
                .find(|(_, v)| v.as_table().is_some_and(|t| t.contains_key(field)))
                .map(|(s, _)| format!("{s}."))
                .unwrap_or_default();
            return ConfigError::UnknownKey {
                origin: origin.to_owned(),
                key: format!("{section}{field}"),
            };
        }
        // Find the offending key by trying each one against the defaults.
        for (section, value) in doc {
            let Some(table) = value.as_table() else {
                return ConfigError::Value {
                    origin: origin.to_owned(),
                    key: section.clone(),
                    value: value.to_string(),
                    reason: "expected a [section] table".into(),
                };
            };
            for (key, v) in table {
                let mut probe = toml::Table::new();
                let mut inner = toml::Table::new();
                inner.insert(key.clone(), v.clone());
                probe.insert(section.clone(), toml::Value::Table(inner));
                if let Err(err) = toml::Value::Table(probe).try_into::<Config>() {
                    return ConfigError::Value {
                        origin: origin.to_owned(),
                        key: format!("{section}.{key}"),
                        value: v.to_string().trim_matches('"').to_owned(),
                        reason: serde_reason(err.message()),
                    };
                }
            }
        }
        ConfigError::Value {
            origin: origin.to_owned(),
            key: "?".into(),
            value: String::new(),
            reason: message,
        }
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, value: &dyn fmt::Display, reason: &str| ConfigError::Value {
            origin: origin.to_owned(),
            key: key.to_owned(),
            value: value.to_string(),
            reason: reason.to_owned(),
        };
        self.listen()
            .map_err(|r| bad("api.listen", &self.api.listen, &r))?;
        for (key, value) in [
            ("api.request_timeout", &self.api.request_timeout),
            ("api.liveness_timeout", &self.api.liveness_timeout),
            ("catalog.rescan_interval", &self.catalog.rescan_interval),
            ("catalog.io_timeout", &self.catalog.io_timeout),
            ("ledger.exit_grace", &self.ledger.exit_grace),
            ("ledger.poll_interval", &self.ledger.poll_interval),
            ("state.save_interval", &self.state.save_interval),
        ] {
            let d = duration(value).map_err(|r| bad(key, value, &r))?;
            if d.is_zero() && key != "ledger.exit_grace" {
                return Err(bad(key, value, "must be greater than zero"));
            }
        }
        if !["full", "lean"].contains(&self.probe.mode.as_str()) {
            return Err(bad("probe.mode", &self.probe.mode, "expected full or lean"));
        }
        if !["auto", "procfs"].contains(&self.probe.seed.as_str()) {
            return Err(bad(
                "probe.seed",
                &self.probe.seed,
                "expected auto or procfs",
            ));
        }
        if !["human", "json"].contains(&self.log.format.as_str()) {
            return Err(bad(
                "log.format",
                &self.log.format,
                "expected human or json",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(bad("log.level", &self.log.level, "not a tracing filter"));
        }
        if self.catalog.max_file_bytes == 0 {
            return Err(bad("catalog.max_file_bytes", &0, "must be at least 1"));
        }
        if self.api.max_concurrent_requests == 0 {
            return Err(bad("api.max_concurrent_requests", &0, "must be at least 1"));
        }
        if self.api.max_connections == 0 {
            return Err(bad("api.max_connections", &0, "must be at least 1"));
        }
        for (key, v) in [
            ("probe.max_accesses", self.probe.max_accesses),
            ("probe.max_fds", self.probe.max_fds),
            ("probe.max_processes", self.probe.max_processes),
        ] {
            if v == 0 {
                return Err(bad(key, &v, "must be at least 1"));
            }
        }
        if self.probe.max_paths_per_process == 0 {
            return Err(bad("probe.max_paths_per_process", &0, "must be at least 1"));
        }
        if !(1..=100).contains(&self.probe.owner_share) {
            return Err(bad(
                "probe.owner_share",
                &self.probe.owner_share,
                "a percentage from 1 to 100",
            ));
        }
        if self.probe.priority_boost > 20 {
            return Err(bad(
                "probe.priority_boost",
                &self.probe.priority_boost,
                "must be at most 20 (nice -20)",
            ));
        }
        if self.probe.queue_bytes < 1 << 16 {
            return Err(bad(
                "probe.queue_bytes",
                &self.probe.queue_bytes,
                "must be at least 65536",
            ));
        }
        if self.api.max_bytes_in_flight < 1 << 20 {
            return Err(bad(
                "api.max_bytes_in_flight",
                &self.api.max_bytes_in_flight,
                "must be at least 1 MiB (1048576)",
            ));
        }
        if self.catalog.max_certificates_per_file == 0 {
            return Err(bad(
                "catalog.max_certificates_per_file",
                &self.catalog.max_certificates_per_file,
                "must be at least 1",
            ));
        }
        if self.catalog.max_content_bytes < 1 << 20 {
            return Err(bad(
                "catalog.max_content_bytes",
                &self.catalog.max_content_bytes,
                "must be at least 1 MiB (1048576)",
            ));
        }
        if !(1 << 20..=1 << 31).contains(&self.state.journal_bytes) {
            return Err(bad(
                "state.journal_bytes",
                &self.state.journal_bytes,
                "must be from 1 MiB to 2 GiB",
            ));
        }
        let rb = self.probe.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            return Err(bad(
                "probe.ring_buffer_bytes",
                &rb,
                "must be a power of two of at least 4096",
            ));
        }
        self.trust_paths().validate().map_err(|e| {
            let (key, value) = match &e {
                TrustPathError::RelativePrefix(p) | TrustPathError::PrefixTooLong(p) => {
                    ("paths.prefixes", p.clone())
                }
                TrustPathError::SuffixLength(s) => ("paths.suffixes", s.clone()),
                TrustPathError::TooManySuffixes { count } => ("paths.suffixes", count.to_string()),
            };
            bad(key, &value, &e.to_string())
        })?;
        Ok(())
    }

    /// Where the API listens: one or more addresses, comma-separated (TCP and a unix
    /// socket, say).
    pub fn listen(&self) -> Result<Vec<Listen>, String> {
        let all: Result<Vec<Listen>, String> = self
            .api
            .listen
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect();
        match all {
            Ok(list) if list.is_empty() => Err("no address to listen on".into()),
            other => other,
        }
    }

    /// Checks a configuration changed after loading (flags that add to lists).
    pub fn check(&self, origin: &str) -> Result<(), ConfigError> {
        self.validate(origin)
    }

    /// The kernel filter this configuration asks for.
    pub fn trust_paths(&self) -> TrustPaths {
        let mut paths = if self.paths.defaults {
            TrustPaths::defaults()
        } else {
            TrustPaths {
                prefixes: vec![],
                suffixes: vec![],
                excludes: vec![],
            }
        };
        paths.prefixes.extend(self.paths.prefixes.iter().cloned());
        paths.suffixes.extend(self.paths.suffixes.iter().cloned());
        paths.excludes.extend(self.paths.excludes.iter().cloned());
        paths
    }

    /// A validated duration field (validation already ran, so this cannot fail then).
    pub fn duration_of(value: &str) -> Duration {
        duration(value).unwrap_or_default()
    }

    /// The effective configuration, as a TOML document (for `trustdrift config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Keys whose change needs a restart, with their old and new values.
    pub fn restart_needed(&self, new: &Config) -> BTreeMap<&'static str, (String, String)> {
        RESTART_KEYS
            .iter()
            .filter_map(|(key, value)| {
                let (was, now) = (value(self), value(new));
                (was != now).then_some((*key, (was, now)))
            })
            .collect()
    }
}

/// How to read one key of a configuration, as text.
type Value = fn(&Config) -> String;

/// Keys fixed until a restart (the probe's tables and globals are set when it is loaded,
/// the listeners and directories when the daemon starts), and how to read each.
const RESTART_KEYS: &[(&str, Value)] = &[
    ("api.listen", |c| c.api.listen.clone()),
    ("api.liveness_timeout", |c| c.api.liveness_timeout.clone()),
    ("api.max_connections", |c| c.api.max_connections.to_string()),
    ("api.max_bytes_in_flight", |c| {
        c.api.max_bytes_in_flight.to_string()
    }),
    ("probe.mode", |c| c.probe.mode.clone()),
    ("probe.seed", |c| c.probe.seed.clone()),
    ("probe.max_accesses", |c| c.probe.max_accesses.to_string()),
    ("probe.max_fds", |c| c.probe.max_fds.to_string()),
    ("probe.max_processes", |c| c.probe.max_processes.to_string()),
    ("probe.ring_buffer_bytes", |c| {
        c.probe.ring_buffer_bytes.to_string()
    }),
    ("probe.max_paths_per_process", |c| {
        c.probe.max_paths_per_process.to_string()
    }),
    ("probe.owner_share", |c| c.probe.owner_share.to_string()),
    ("probe.queue_bytes", |c| c.probe.queue_bytes.to_string()),
    ("probe.priority_boost", |c| {
        c.probe.priority_boost.to_string()
    }),
    ("state.dir", |c| c.state.dir.clone()),
    ("state.pin_dir", |c| c.state.pin_dir.clone()),
    ("state.journal_bytes", |c| c.state.journal_bytes.to_string()),
    ("state.journal_dir", |c| c.state.journal_dir.clone()),
];

fn duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("not a duration ({e}); write e.g. 250ms, 30s, 5m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.0);
            }
        }
        let p = std::env::temp_dir().join(format!(
            "trustdrift-config-{}-{:x}.toml",
            std::process::id(),
            text.len() * 7919 + text.bytes().map(usize::from).sum::<usize>()
        ));
        fs::write(&p, text).unwrap();
        (p.clone(), Rm(p))
    }

    #[test]
    fn no_file_means_the_built_in_defaults() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen().unwrap()[0].to_string(), "127.0.0.1:9477");
    }

    #[test]
    fn file_then_environment_then_flags() {
        let (path, _rm) = file(
            "[api]\nlisten = \"127.0.0.1:1000\"\n[catalog]\nmax_file_bytes = 100\n[probe]\nmode = \"lean\"\n",
        );
        let env = env_overrides(
            [
                (
                    "TRUSTDRIFT_API_LISTEN".to_owned(),
                    "127.0.0.1:2000".to_owned(),
                ),
                ("TRUSTDRIFT_BIN".to_owned(), "/x".to_owned()),
                ("PATH".to_owned(), "/bin".to_owned()),
            ]
            .into_iter(),
        );
        assert_eq!(env.len(), 1, "only config keys are overrides");
        let mut overrides = env;
        overrides.push(parse_set("api.listen=127.0.0.1:3000").unwrap());
        overrides.push(parse_set("paths.suffixes=.foo, .bar").unwrap());
        let c = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:3000");
        assert_eq!(c.catalog.max_file_bytes, 100);
        assert_eq!(c.probe.mode, "lean");
        assert_eq!(c.paths.suffixes, vec![".foo", ".bar"]);
        let c = Config::load(Some(&path), &overrides[..1]).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:2000");
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let cases = [
            (
                "[catalog]\nmax_file_bytes = \"lots\"\n",
                "catalog.max_file_bytes",
                "lots",
            ),
            ("[api]\nlisten = \"localhost\"\n", "api.listen", "localhost"),
            (
                "[ledger]\nexit_grace = \"soon\"\n",
                "ledger.exit_grace",
                "soon",
            ),
            ("[probe]\nmode = \"turbo\"\n", "probe.mode", "turbo"),
            (
                "[paths]\nprefixes = [\"etc/ssl\"]\n",
                "paths.prefixes",
                "etc/ssl",
            ),
            (
                "[probe]\nring_buffer_bytes = 1000\n",
                "probe.ring_buffer_bytes",
                "1000",
            ),
        ];
        for (text, key, value) in cases {
            let (path, _rm) = file(text);
            let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
            assert!(err.contains(value), "{err} should name {value}");
            assert!(err.contains(path.to_str().unwrap()), "{err}");
        }
        let (path, _rm) = file("[catalog]\nmax_file_byte = 1\n");
        let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key `catalog.max_file_byte`"), "{err}");
        let (path, _rm) = file("[api\nlisten=");
        assert!(matches!(
            Config::load(Some(&path), &[]),
            Err(ConfigError::Syntax { .. })
        ));
        let err = Config::load(None, &[parse_set("probe.mode=fast").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set") && err.contains("probe.mode") && err.contains("fast"));
        let err = Config::load(None, &[parse_set("nope.key=1").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `nope.key`"), "{err}");
        assert!(Config::load(Some(Path::new("/nonexistent/config.toml")), &[]).is_err());
    }

    #[test]
    fn listen_takes_tcp_and_unix_sockets() {
        let c = Config {
            api: Api {
                listen: "127.0.0.1:9477, unix:/run/trustdrift/api.sock".into(),
                ..Api::default()
            },
            ..Config::default()
        };
        assert_eq!(c.listen().unwrap().len(), 2);
        assert_eq!(
            "unix:/run/td.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/td.sock".into()))
        );
        assert!("unix:relative.sock".parse::<Listen>().is_err());
        assert!("[::1]:9477".parse::<Listen>().is_ok());
    }

    #[test]
    fn the_effective_config_round_trips_as_toml() {
        let c = Config::default();
        let text = c.to_toml();
        let (path, _rm) = file(&text);
        assert_eq!(Config::load(Some(&path), &[]).unwrap(), c);
    }
}
