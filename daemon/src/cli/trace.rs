//! `trustdrift trace`: live trust-file accesses, one line per first open of a path by a
//! process, then a line whenever its aggregated reads move, and a final line when the
//! process exits or execs.

use std::{collections::HashMap, io::Write, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use trustdrift_common::{AccessKey, AccessStats};

use crate::{
    events::clock,
    events::{self, Access, Event, Task},
    probe::{Probe, ProbeOptions},
    process::attribution::{self, Attribution},
    process::procfs,
    process::{
        deadline::{self, Deadline},
        resolution::{self, Resolver},
        rootfs::Root,
    },
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// One line of output.
#[derive(Serialize)]
struct Line<'a> {
    /// open | update | exec | exit
    event: &'static str,
    time: String,
    pid: u32,
    tid: u32,
    comm: &'a str,
    uid: u32,
    start_time: Option<String>,
    cgroup_id: u64,
    #[serde(flatten)]
    attribution: &'a Attribution,
    path: String,
    /// The opened file's path in the process's root, as the kernel knew it at the open.
    opened: Option<String>,
    resolved: Option<&'a str>,
    resolve_error: Option<&'a str>,
    dirfd: i32,
    fd: i32,
    open_flags: u32,
    matched_by: Vec<&'static str>,
    bytes_read: u64,
    opens: u64,
    reads: u64,
    first_open: Option<String>,
    last_read: Option<String>,
}

struct Row {
    access: Access,
    attribution: Attribution,
    resolved: Result<String, String>,
    stats: AccessStats,
}

fn stamp(boot_ns: u64) -> Option<String> {
    (boot_ns != 0).then(|| clock::rfc3339(clock::wall_time(boot_ns)))
}

struct Printer {
    format: Format,
    out: std::io::Stdout,
}

impl Printer {
    fn header(&mut self) {
        if self.format == Format::Table {
            let _ = writeln!(
                self.out,
                "{:<12} {:<6} {:>7} {:<15} {:<14} {:>10}  PATH -> RESOLVED",
                "TIME", "EVENT", "PID", "COMM", "CONTAINER", "BYTES"
            );
        }
    }

    fn row(&mut self, event: &'static str, time_ns: u64, row: &Row) {
        let a = &row.access;
        let (resolved, resolve_error) = match &row.resolved {
            Ok(p) => (Some(p.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        let time = clock::rfc3339(clock::wall_time(time_ns));
        let path = resolution::display(&a.path);
        match self.format {
            Format::Json => {
                let line = Line {
                    event,
                    time,
                    pid: a.task.tgid,
                    tid: a.task.tid,
                    comm: &a.task.comm,
                    uid: a.task.uid,
                    start_time: stamp(a.task.start_ns),
                    cgroup_id: a.task.cgroup_id,
                    attribution: &row.attribution,
                    path,
                    opened: a.kernel_path.as_deref().map(resolution::display),
                    resolved,
                    resolve_error,
                    dirfd: a.dirfd,
                    fd: a.fd,
                    open_flags: a.open_flags,
                    matched_by: a.matched_by(),
                    bytes_read: row.stats.bytes,
                    opens: row.stats.opens,
                    reads: row.stats.reads,
                    first_open: stamp(row.stats.first_open_ns),
                    last_read: stamp(row.stats.last_read_ns),
                };
                if let Ok(text) = serde_json::to_string(&line) {
                    let _ = writeln!(self.out, "{text}");
                }
            }
            Format::Table => {
                let clock = time.get(11..23).unwrap_or(&time).to_owned();
                let target = resolved.map_or_else(
                    || format!("({})", resolve_error.unwrap_or("unresolved")),
                    str::to_owned,
                );
                let _ = writeln!(
                    self.out,
                    "{clock:<12} {event:<6} {:>7} {:<15} {:<14} {:>10}  {path} -> {target}",
                    a.task.tgid,
                    a.task.comm,
                    row.attribution.short(),
                    row.stats.bytes,
                );
            }
        }
        let _ = self.out.flush();
    }
}

pub struct TraceOptions {
    pub probe: ProbeOptions,
    pub format: Format,
    /// How often aggregated reads are polled for changes.
    pub interval: Duration,
}

struct Tracer {
    probe: Probe,
    printer: Printer,
    resolver: Resolver,
    io: Deadline,
    rows: HashMap<AccessKey, Row>,
    events: u64,
    undecodable: u64,
}

impl Tracer {
    fn on_event(&mut self, event: Event) {
        self.events += 1;
        match event {
            Event::Access(access) => self.on_access(access),
            Event::Exec(task) => self.on_end("exec", &task, |k| k.exec_seq == task.exec_seq),
            Event::Exit(task) => {
                self.on_end("exit", &task, |_| true);
                self.resolver.forget_process(task.tgid, task.start_ns);
            }
            // `trace` never watches accesses.
            Event::Reread(_) => {}
        }
    }

    /// Where the access's path leads in its process's root, under the deadline (the
    /// root's filesystem may never answer).
    fn resolve(&mut self, access: &Access, alive: bool) -> Result<String, String> {
        let absolute = self
            .resolver
            .absolute(access, alive)
            .map_err(|e| e.to_string())?;
        let pid = access.task.tgid;
        let root = match Root::of_pid(pid) {
            Ok(root) if procfs::is_same_process(pid, access.task.start_ns) => root,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(
                    "permission denied opening the process's root (the daemon needs \
                            CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
                        .into(),
                );
            }
            _ if access.task.mnt_ns != 0
                && procfs::host_mount_namespace() == Some(access.task.mnt_ns) =>
            {
                Root::host().map_err(|e| e.to_string())?
            }
            _ => return Err("process exited before its root could be read".into()),
        };
        let canonical = self
            .io
            .run(deadline::key(("trace", pid, &absolute)), move || {
                root.canonicalize(&absolute)
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.resolver.remember(access, &canonical);
        Ok(resolution::display(&canonical))
    }

    fn on_access(&mut self, access: Access) {
        let alive = procfs::is_same_process(access.task.tgid, access.task.start_ns);
        let resolved = self.resolve(&access, alive);
        let attribution = alive
            .then(|| procfs::cgroup_path(access.task.tgid))
            .flatten()
            .map(|p| attribution::from_cgroup_path(&p))
            .unwrap_or_default();
        let stats = self.probe.access_stats(&access.key).unwrap_or_default();
        let row = Row {
            access,
            attribution,
            resolved,
            stats,
        };
        self.printer.row("open", row.access.task.ts_ns, &row);
        self.rows.insert(row.access.key, row);
    }

    /// A process exited or replaced its image: print the final totals of the accesses it
    /// made and let the probe drop them.
    fn on_end(&mut self, what: &'static str, task: &Task, also: impl Fn(&AccessKey) -> bool) {
        let keys: Vec<AccessKey> = self
            .rows
            .keys()
            .filter(|k| k.tgid == task.tgid && k.start_ns == task.start_ns && also(k))
            .copied()
            .collect();
        for key in keys {
            if let Some(mut row) = self.rows.remove(&key) {
                if let Some(stats) = self.probe.access_stats(&key) {
                    row.stats = stats;
                }
                self.printer.row(what, task.ts_ns, &row);
                self.probe.forget_access(&key);
            }
        }
    }

    fn poll_reads(&mut self) {
        for row in self.rows.values_mut() {
            let Some(stats) = self.probe.access_stats(&row.access.key) else {
                continue;
            };
            if stats.bytes != row.stats.bytes
                || stats.reads != row.stats.reads
                || stats.opens != row.stats.opens
            {
                row.stats = stats;
                let when = stats.last_read_ns.max(stats.last_open_ns);
                self.printer.row("update", when, row);
            }
        }
    }

    fn summary(&self) {
        let losses: Vec<(String, u64)> = self
            .probe
            .losses()
            .iter()
            .map(|(l, n)| (l.name().to_owned(), *n))
            .collect();
        let lost: u64 = losses.iter().map(|(_, n)| n).sum();
        match self.printer.format {
            Format::Json => {
                let map: serde_json::Map<String, serde_json::Value> =
                    losses.into_iter().map(|(k, v)| (k, v.into())).collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "summary",
                        "events": self.events,
                        "undecodable": self.undecodable,
                        "losses": map,
                    })
                );
            }
            Format::Table => {
                eprintln!(
                    "trustdrift: {} events, {} undecodable, {lost} observations lost{}",
                    self.events,
                    self.undecodable,
                    if lost == 0 {
                        String::new()
                    } else {
                        format!(
                            " ({})",
                            losses
                                .iter()
                                .filter(|(_, n)| *n > 0)
                                .map(|(k, n)| format!("{k}={n}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
            }
        }
    }
}

pub async fn run(options: TraceOptions) -> Result<()> {
    // Handlers first: a Ctrl-C right after attaching must still detach cleanly.
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut probe = Probe::attach(options.probe)?;
    let ring = probe.take_events()?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer,
    // and always reports that same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
    let mut tracer = Tracer {
        probe,
        printer: Printer {
            format: options.format,
            out: std::io::stdout(),
        },
        resolver: Resolver::default(),
        io: Deadline::new(deadline::Limits::default()),
        rows: HashMap::new(),
        events: 0,
        undecodable: 0,
    };
    tracing::info!(mode = ?tracer.probe.mode, "probe attached; tracing trust-file accesses");
    tracer.printer.header();

    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                let mut decoded = Vec::new();
                while let Some(item) = guard.get_inner_mut().next() {
                    decoded.push(events::decode(&item));
                }
                guard.clear_ready();
                for event in decoded {
                    match event {
                        Ok(event) => tracer.on_event(event),
                        Err(e) => {
                            tracer.undecodable += 1;
                            tracing::warn!("dropping a ring-buffer record: {e}");
                        }
                    }
                }
            }
            _ = tick.tick() => tracer.poll_reads(),
        }
    }
    // Flush what is still in flight, then detach (dropping the probe).
    tracer.poll_reads();
    tracer.summary();
    Ok(())
}
