//! `/metrics`: the Prometheus exposition, built per scrape from the published snapshot.
//!
//! Names follow x509-certificate-exporter and cert-manager: absolute times are
//! `*_timestamp_seconds`, labels that do not apply are `""`. Cardinality is bounded by
//! default: processes are grouped by (kind, confidence, namespace, pod, container, comm);
//! no pid, path or command line labels unless `metrics.per_process` asks for them.

use std::{collections::BTreeMap, time::SystemTime};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    judge::verdict::{TrustKind, Verdict},
    serve::snapshot::{Snapshot, StoreFigures},
    serve::views::{Confidence, ProcessView},
};

type Labels = Vec<(String, String)>;

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn float_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> {
    let family = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(name, help, family.clone());
    family
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The grouping labels of a process, plus `kind` and `confidence`.
fn group(p: &ProcessView, kind: TrustKind, confidence: Confidence) -> Labels {
    let a = &p.attribution;
    let container = a
        .container
        .clone()
        .or_else(|| {
            a.container_id
                .as_ref()
                .map(|id| id[..id.len().min(12)].to_owned())
        })
        .unwrap_or_default();
    labels(&[
        (
            "kind",
            match kind {
                TrustKind::Ca => "ca",
                TrustKind::Identity => "identity",
            },
        ),
        (
            "confidence",
            match confidence {
                Confidence::Observed => "observed",
                Confidence::Unverified => "unverified",
            },
        ),
        ("namespace", a.namespace.as_deref().unwrap_or("")),
        ("pod", a.pod.as_deref().unwrap_or("")),
        ("container", &container),
        ("comm", &p.comm),
    ])
}

/// Rewrites OpenMetrics text as the classic Prometheus text format (0.0.4), for scrapers
/// and tools that do not ask for OpenMetrics: counter families take their `_total` name,
/// and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The exposition text (OpenMetrics) for `snapshot`, with the API's refusals by reason.
pub fn render(snapshot: &Snapshot, api_refusals: &[(&str, u64)]) -> String {
    let mut registry = match &snapshot.options.node {
        Some(node) => {
            Registry::with_labels(std::iter::once(("node".into(), node.to_string().into())))
        }
        None => Registry::default(),
    };
    let stale = gauge_family(
        &mut registry,
        "trustdrift_stale_processes",
        "Processes whose in-memory trust material is older than the files on disk",
    );
    let stale_since = float_family(
        &mut registry,
        "trustdrift_stale_since_timestamp_seconds",
        "When the oldest stale process of the group became stale",
    );
    let expired = gauge_family(
        &mut registry,
        "trustdrift_expired_in_memory_processes",
        "Processes holding a certificate that has expired while its renewal is on disk",
    );
    let expiration = float_family(
        &mut registry,
        "trustdrift_stale_certificate_expiration_timestamp_seconds",
        "Earliest notAfter among the certificates the group's processes hold in memory \
         whose renewal is on disk (unix seconds)",
    );
    let removed = gauge_family(
        &mut registry,
        "trustdrift_removed_ca_trusted_processes",
        "Processes that still trust a CA removed from disk",
    );
    let by_verdict = gauge_family(
        &mut registry,
        "trustdrift_processes",
        "Processes with trust reads, by verdict",
    );
    let per_process = snapshot.options.per_process.then(|| {
        gauge_family(
            &mut registry,
            "trustdrift_process_verdict",
            "One series per process (opt-in: metrics.per_process)",
        )
    });

    let mut counts: BTreeMap<Verdict, i64> = [
        Verdict::Fresh,
        Verdict::Stale,
        Verdict::ExpiredInMemory,
        Verdict::Unverified,
    ]
    .into_iter()
    .map(|v| (v, 0))
    .collect();
    let mut oldest: BTreeMap<Labels, f64> = BTreeMap::new();
    let mut earliest_expiry: BTreeMap<Labels, i64> = BTreeMap::new();
    for p in snapshot.processes.values() {
        if p.exited_at.is_some() {
            continue;
        }
        *counts.entry(p.verdict).or_default() += 1;
        if let Some(family) = &per_process {
            family
                .get_or_create(&labels(&[
                    ("pid", &p.pid.to_string()),
                    ("comm", &p.comm),
                    ("exe", p.exe.as_deref().unwrap_or("")),
                    ("verdict", p.verdict.as_str()),
                ]))
                .set(1);
        }
        if p.verdict == Verdict::Unverified {
            stale
                .get_or_create(&group(p, TrustKind::Ca, Confidence::Unverified))
                .inc();
            continue;
        }
        if p.verdict < Verdict::Stale {
            continue;
        }
        let kinds: std::collections::BTreeSet<TrustKind> = p
            .files
            .iter()
            .filter(|f| f.verdict >= Verdict::Stale)
            .map(|f| f.kind)
            .collect();
        for kind in kinds {
            let l = group(p, kind, Confidence::Observed);
            stale.get_or_create(&l).inc();
            if let Some(since) = p
                .files
                .iter()
                .filter(|f| f.kind == kind && f.verdict >= Verdict::Stale)
                .filter_map(|f| f.stale_since.map(|s| s.0))
                .min()
            {
                let s = seconds(since);
                let e = oldest.entry(l.clone()).or_insert(s);
                *e = e.min(s);
            }
            if let Some(not_after) = p
                .files
                .iter()
                .filter(|f| f.kind == kind)
                .flat_map(|f| &f.expiring_in_memory)
                .map(|e| e.not_after)
                .min()
            {
                let e = earliest_expiry.entry(l.clone()).or_insert(not_after);
                *e = (*e).min(not_after);
            }
            if p.files
                .iter()
                .any(|f| f.kind == kind && f.verdict == Verdict::ExpiredInMemory)
            {
                expired.get_or_create(&l).inc();
            }
            if p.files
                .iter()
                .any(|f| f.kind == kind && !f.removed_cas_trusted.is_empty())
            {
                removed.get_or_create(&l).inc();
            }
        }
    }
    for (l, s) in oldest {
        stale_since.get_or_create(&l).set(s);
    }
    for (l, not_after) in earliest_expiry {
        expiration.get_or_create(&l).set(not_after as f64);
    }
    for (v, n) in counts {
        by_verdict
            .get_or_create(&labels(&[("verdict", v.as_str())]))
            .set(n);
    }

    stores(&mut registry, snapshot.stores.values());
    health(&mut registry, snapshot);
    own_usage(&mut registry);
    let refused = counter_family(
        &mut registry,
        "trustdrift_api_refused",
        "API connections and requests turned away, by reason",
    );
    for (reason, n) in api_refusals {
        refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

fn stores<'a>(registry: &mut Registry, stores: impl Iterator<Item = &'a StoreFigures>) {
    let certs = gauge_family(
        registry,
        "trustdrift_store_certificates",
        "Certificates in a trust store on disk now",
    );
    let changed = float_family(
        registry,
        "trustdrift_store_last_change_timestamp_seconds",
        "When a trust store's content last changed",
    );
    let info = gauge_family(
        registry,
        "trustdrift_store_info",
        "The content a trust store has on disk now (value 1); sha256 only for certificates",
    );
    for s in stores {
        let l = labels(&[("store", &s.store)]);
        certs.get_or_create(&l).set(s.certificates as i64);
        changed.get_or_create(&l).set(seconds(s.changed_at));
        // Anything but certificates is never fingerprinted in the open (a key, a secret).
        let sha256 = s.sha256.as_deref().unwrap_or("");
        info.get_or_create(&labels(&[("store", &s.store), ("sha256", sha256)]))
            .set(1);
    }
}

/// The conventional process metrics (as client_golang's process collector names them),
/// so the daemon's own cost sits beside node_exporter's figures.
fn own_usage(registry: &mut Registry) {
    let Some(u) = crate::process::procfs::own_usage() else {
        return;
    };
    let float = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(value);
        registry.register(name, help, g);
    };
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(u.cpu_seconds);
    registry.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );
    float(
        registry,
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        u.resident_bytes as f64,
    );
    float(
        registry,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        u.virtual_bytes as f64,
    );
    float(
        registry,
        "process_open_fds",
        "Number of open file descriptors",
        u.open_fds as f64,
    );
    float(
        registry,
        "process_max_fds",
        "Maximum number of open file descriptors",
        u.max_fds as f64,
    );
    let started = crate::events::clock::wall_time(
        u.start_ticks * (1_000_000_000 / crate::process::procfs::clock_ticks_per_second()),
    );
    float(
        registry,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    );
}

fn health(registry: &mut Registry, snapshot: &Snapshot) {
    let h = &snapshot.health;
    let events = counter_family(
        registry,
        "trustdrift_events",
        "Probe records received, by kind",
    );
    for (kind, n) in &h.events {
        events.get_or_create(&labels(&[("kind", kind)])).inc_by(*n);
    }
    let lost = counter_family(
        registry,
        "trustdrift_events_lost",
        "Observations that could not be kept, by reason (kernel and daemon side)",
    );
    for (reason, n) in &h.lost {
        lost.get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
    }
    let scan = counter_family(
        registry,
        "trustdrift_scan_errors",
        "Trust files that could not be read or hashed, by reason",
    );
    for (reason, n) in &h.scan_errors {
        scan.get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
    }
    let parse = Counter::<u64>::default();
    registry.register(
        "trustdrift_parse_errors",
        "Problems found while parsing trust files (malformed certificates, truncated stores)",
        parse.clone(),
    );
    parse.inc_by(h.parse_errors);
    let hashed = Counter::<u64>::default();
    registry.register(
        "trustdrift_files_hashed",
        "Trust file contents read and hashed (cache misses)",
        hashed.clone(),
    );
    hashed.inc_by(h.contents_hashed);

    let attached = Gauge::<i64>::default();
    registry.register(
        "trustdrift_probe_attached",
        "1 while the eBPF probe is attached",
        attached.clone(),
    );
    attached.set(i64::from(h.probe_attached));
    let pinned = Gauge::<i64>::default();
    registry.register(
        "trustdrift_probe_pinned",
        "1 when the probe's maps and links are pinned and survive a daemon restart",
        pinned.clone(),
    );
    pinned.set(i64::from(h.pinned));
    let ready = Gauge::<i64>::default();
    registry.register(
        "trustdrift_ready",
        "1 once the probe is attached and the start-up scan is done",
        ready.clone(),
    );
    ready.set(i64::from(snapshot.ready));

    let run_time = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(
        "trustdrift_bpf_program_run_time_seconds",
        "Kernel-accounted run time of each probe program (needs metrics.bpf_stats)",
        run_time.clone(),
    );
    let runs = counter_family(
        registry,
        "trustdrift_bpf_program_runs",
        "Kernel-accounted invocations of each probe program (needs metrics.bpf_stats)",
    );
    for p in &h.programs {
        let l = labels(&[("program", &p.name)]);
        run_time
            .get_or_create(&l)
            .inc_by(p.run_time_ns as f64 / 1e9);
        runs.get_or_create(&l).inc_by(p.run_count);
    }
    let entries = gauge_family(
        registry,
        "trustdrift_bpf_map_entries",
        "Entries in a probe map",
    );
    let capacity = gauge_family(
        registry,
        "trustdrift_bpf_map_capacity",
        "Capacity (max_entries) of a probe map",
    );
    for m in &h.maps {
        let l = labels(&[("map", m.map)]);
        entries.get_or_create(&l).set(m.entries as i64);
        capacity.get_or_create(&l).set(m.capacity as i64);
    }
    let tracked = gauge_family(
        registry,
        "trustdrift_tracked",
        "What the daemon holds in memory, by kind (processes, files, watches, queued record bytes)",
    );
    for (what, n) in &h.tracked {
        tracked
            .get_or_create(&labels(&[("what", what)]))
            .set(*n as i64);
    }
    let saved = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    registry.register(
        "trustdrift_state_last_save_timestamp_seconds",
        "When the ledger was last persisted to the state directory (0: never)",
        saved.clone(),
    );
    saved.set(h.last_save.map_or(0.0, seconds));
    let unjournalled = Counter::<u64>::default();
    registry.register(
        "trustdrift_state_journal_overflows",
        "Records handled while the crash journal was full: a crash before the next save \
         would have lost them (raise state.journal_bytes)",
        unjournalled.clone(),
    );
    unjournalled.inc_by(h.unjournalled);
    let build = gauge_family(
        registry,
        "trustdrift_build_info",
        "Build information (value 1)",
    );
    build
        .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
        .set(1);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        judge::renewal::Match,
        ledger::Origin,
        process::attribution::Attribution,
        serve::views::{CertList, CertView, ExpiringView, FileView, RenewalView, Stamp},
        stores::formats::CertInfo,
    };

    const T: i64 = 1_800_000_000;

    fn cert(cn: &str, not_after: i64) -> CertView {
        CertView::from(&CertInfo {
            subject: format!("CN={cn}"),
            issuer: "CN=CA".into(),
            serial: "01".into(),
            sha256: format!("{cn:0>64}"),
            not_before: 0,
            not_after,
            is_ca: false,
            spki_sha256: String::new(),
        })
    }

    /// A file of `kind` holding certificates that expire at `expiries`, each renewed on
    /// disk.
    fn file(kind: TrustKind, expiries: &[i64]) -> FileView {
        let at = Stamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(T as u64));
        FileView {
            path: "/etc/tls/tls.crt".into(),
            resolved: None,
            kind,
            verdict: Verdict::Stale,
            stale_since: Some(at),
            first_open: at,
            last_open: at,
            last_read: Some(at),
            bytes_read: 1,
            opens: 1,
            reads: 1,
            listed: false,
            read_version: None,
            read_at: at,
            current_version: None,
            missing_cas: CertList::default(),
            removed_cas_trusted: CertList::default(),
            removed_cas_expired: CertList::default(),
            expiring_in_memory: expiries
                .iter()
                .map(|&n| ExpiringView {
                    certificate: cert("old", n),
                    renewed_by: RenewalView {
                        certificate: cert("new", n + 90 * 86400),
                        matched_by: Match::SameIssuer,
                        on_disk_since: at,
                    },
                    not_after: n,
                })
                .collect(),
            expired_in_memory: CertList::default(),
            note: None,
        }
    }

    fn process(pid: u32, comm: &str, pod: Option<&str>, files: Vec<FileView>) -> Arc<ProcessView> {
        Arc::new(ProcessView {
            pid,
            start_time: None,
            comm: comm.into(),
            exe: None,
            cmdline: None,
            uid: 0,
            attribution: Attribution {
                namespace: pod.map(|_| "payments".into()),
                pod: pod.map(Into::into),
                container: pod.map(|_| "proxy".into()),
                ..Attribution::default()
            },
            origin: Origin::Observed,
            confidence: Confidence::Observed,
            verdict: Verdict::Stale,
            stale_since: None,
            tls_library: None,
            exited_at: None,
            files,
        })
    }

    /// A snapshot's views from a list, keyed as the publisher keys them.
    fn views(list: Vec<Arc<ProcessView>>) -> crate::serve::snapshot::ProcessViews {
        list.into_iter()
            .map(|p| {
                let key = crate::ledger::ProcKey {
                    pid: p.pid,
                    start_ticks: 0,
                };
                (key, p)
            })
            .collect()
    }

    #[test]
    fn the_expiry_ahead_gauge_is_the_earliest_held_renewed_certificate_per_group() {
        let day = 86400;
        let snapshot = crate::serve::snapshot::Snapshot {
            processes: views(vec![
                // One group, two processes: the earliest of all their certificates.
                process(
                    1,
                    "envoy",
                    Some("edge-1"),
                    vec![file(TrustKind::Identity, &[T + 5 * day, T + 2 * day])],
                ),
                process(
                    2,
                    "envoy",
                    Some("edge-1"),
                    vec![file(TrustKind::Identity, &[T + 3 * day])],
                ),
                // Its CA file is another group (kind), with its own earliest.
                process(
                    3,
                    "envoy",
                    Some("edge-1"),
                    vec![file(TrustKind::Ca, &[T + 30 * day])],
                ),
                // Stale, nothing renewed: no series.
                process(4, "python3", None, vec![file(TrustKind::Ca, &[])]),
            ]),
            ..Default::default()
        };
        let text = render(&snapshot, &[]);
        let family = "trustdrift_stale_certificate_expiration_timestamp_seconds";
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .collect();
        assert_eq!(series.len(), 2, "{text}");
        let identity = series
            .iter()
            .find(|l| l.contains("kind=\"identity\""))
            .unwrap();
        assert!(
            identity.contains("confidence=\"observed\"")
                && identity.contains("namespace=\"payments\"")
                && identity.contains("pod=\"edge-1\"")
                && identity.contains("container=\"proxy\"")
                && identity.contains("comm=\"envoy\""),
            "{identity}"
        );
        let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        assert_eq!(value(identity), (T + 2 * day) as f64);
        let ca = series.iter().find(|l| l.contains("kind=\"ca\"")).unwrap();
        assert_eq!(value(ca), (T + 30 * day) as f64);
        assert!(
            !text.contains(&format!(
                "{family}{{kind=\"ca\",confidence=\"observed\",namespace=\"\""
            )),
            "{text}"
        );
        // The same labels as the stale gauge's series of that group.
        let stale = text
            .lines()
            .find(|l| {
                l.starts_with("trustdrift_stale_processes{") && l.contains("kind=\"identity\"")
            })
            .unwrap();
        assert_eq!(
            identity.split_once('}').unwrap().0[family.len()..],
            stale.split_once('}').unwrap().0["trustdrift_stale_processes".len()..]
        );
    }

    #[test]
    fn the_expiry_ahead_gauge_has_no_series_when_nothing_held_is_renewed_or_the_holder_exited() {
        let mut gone = (*process(1, "envoy", None, vec![file(TrustKind::Identity, &[T])])).clone();
        gone.exited_at = Some(Stamp(SystemTime::now()));
        let snapshot = crate::serve::snapshot::Snapshot {
            processes: views(vec![
                Arc::new(gone),
                process(2, "nginx", None, vec![file(TrustKind::Identity, &[])]),
            ]),
            ..Default::default()
        };
        let text = render(&snapshot, &[]);
        assert!(text.contains("trustdrift_stale_processes{"), "{text}");
        assert!(
            !text.contains("trustdrift_stale_certificate_expiration_timestamp_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn every_series_carries_the_node_when_one_is_configured() {
        let mut snapshot = crate::serve::snapshot::Snapshot::default();
        let plain = render(&snapshot, &[("too_many_requests", 0)]);
        assert!(plain.contains("trustdrift_ready 0"), "{plain}");
        snapshot.options.node = Some("node-a".into());
        let text = render(&snapshot, &[("too_many_requests", 2)]);
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(!series.is_empty());
        for line in series {
            assert!(line.contains("node=\"node-a\""), "{line}");
        }
    }

    #[test]
    fn counters_are_renamed_for_the_classic_text_format() {
        let om = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total{kind=\"a\"} 3\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\nx_up 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\n\
             x_events_total{kind=\"a\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
