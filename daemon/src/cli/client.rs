//! The command-line face of the API: `trustdrift processes` (what needs a restart now, as
//! a table like `kubectl get`) and `trustdrift explain <pid>` (the verdict in words). Both
//! ask the local daemon over its API, TCP or unix socket; neither reads a trust file.
//!
//! Both exit with a status scripts and node checks can act on, as Nagios plugins do
//! ([`Status`]): 0 nothing to do, 1 stale, 2 an outage now or within a day, 3 no answer.

use std::{
    cmp::Reverse,
    io::{Read, Write},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::config::Listen;

/// GET `path` from the daemon; the JSON body on 2xx, an error naming the reason else.
pub fn get(listen: &Listen, path: &str) -> Result<Value> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: trustdrift\r\nConnection: close\r\n\r\n");
    let timeout = Some(Duration::from_secs(10));
    let raw = match listen {
        Listen::Tcp(addr) => {
            let mut s = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to the daemon at {addr} (is it running?)"))?;
            s.set_read_timeout(timeout)?;
            s.write_all(request.as_bytes())?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            raw
        }
        Listen::Unix(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| {
                format!(
                    "connecting to the daemon at unix:{} (is it running?)",
                    path.display()
                )
            })?;
            s.set_read_timeout(timeout)?;
            s.write_all(request.as_bytes())?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            raw
        }
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the daemon sent no HTTP response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the daemon sent no HTTP status")?;
    let body = decode_body(head, body);
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
    if !(200..300).contains(&status) {
        let reason = json["reason"].as_str().unwrap_or(&body).to_owned();
        bail!("{reason} (HTTP {status})");
    }
    Ok(json)
}

/// The body, de-chunked if the server used chunked encoding.
fn decode_body(head: &str, body: &str) -> String {
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    if !chunked {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn time(v: &Value) -> Option<SystemTime> {
    v.as_str().and_then(|t| humantime::parse_rfc3339(t).ok())
}

/// What a client asks `GET /processes` for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Exited processes too (the daemon keeps them for `ledger.exit_grace`).
    pub all: bool,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub comm: Option<String>,
    pub verdict: Option<String>,
}

impl Query {
    /// The request path, its filters URL-encoded.
    pub fn path(&self) -> String {
        let mut pairs: Vec<(&str, &str)> = [
            ("verdict", &self.verdict),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
            ("comm", &self.comm),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
        if !self.all {
            pairs.push(("exited", "false"));
        }
        if pairs.is_empty() {
            return "/processes".into();
        }
        let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        format!("/processes?{query}")
    }
}

/// A certificate held past this close to its notAfter (its renewal on disk) is an outage
/// in waiting: status 2, as TrustDriftStaleCertificateExpiration pages at one day.
pub const CRITICAL_WITHIN: Duration = Duration::from_secs(86400);

/// The exit status of `processes` and `explain`, worst of the live processes listed.
/// Nagios plugins' scale, which node checks (Icinga, Sensu, Consul, Datadog's and
/// node-problem-detector's custom plugins) read: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
/// It follows the shipped alerts: what warns is 1, what pages is 2; unverified processes
/// (an info-level hint) and exited ones never raise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Nothing listed needs a restart.
    Ok = 0,
    /// A live process listed is stale.
    Stale = 1,
    /// A live process listed holds an expired certificate whose renewal is on disk, or one
    /// that expires within [`CRITICAL_WITHIN`].
    Critical = 2,
    /// No verdict: the daemon could not be reached or refused the request, or the command
    /// line is wrong.
    Unknown = 3,
}

impl Status {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The earliest notAfter among the certificates `p` holds whose renewal is on disk.
fn earliest_expiry(p: &Value) -> Option<SystemTime> {
    list(&p["files"])
        .iter()
        .flat_map(|f| list(&f["expiring_in_memory"]))
        .filter_map(|e| time(&e["certificate"]["not_after"]))
        .min()
}

/// The status one process calls for.
pub fn status_of(p: &Value, now: SystemTime) -> Status {
    if !p["exited_at"].is_null() {
        return Status::Ok;
    }
    let soon = earliest_expiry(p).is_some_and(|t| t <= now + CRITICAL_WITHIN);
    match s(&p["verdict"]) {
        "expired_in_memory" => Status::Critical,
        "stale" if soon => Status::Critical,
        "stale" => Status::Stale,
        _ => Status::Ok,
    }
}

/// The status a list of processes calls for: the worst of them.
pub fn status(processes: &Value, now: SystemTime) -> Status {
    list(processes)
        .iter()
        .map(|p| status_of(p, now))
        .max()
        .unwrap_or(Status::Ok)
}

/// A duration as `kubectl get` writes ages: "45s", "5m30s", "2h5m", "3d4h", "400d".
pub fn age(d: Duration) -> String {
    let secs = d.as_secs();
    let (m, h, days) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        match secs % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            m => format!("{h}h{m}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{days}d"),
            h => format!("{days}d{h}h"),
        }
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        format!("{}y{}d", days / 365, days % 365)
    }
}

/// A duration in words' shorthand, its two largest units: "1d 23h", "5h 3m", "42s".
pub fn span(d: Duration) -> String {
    let secs = d.as_secs();
    let units = [(86400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let Some(first) = units.iter().position(|(n, _)| secs >= *n) else {
        return "0s".into();
    };
    let (n, u) = units[first];
    let mut out = format!("{}{u}", secs / n);
    if let Some((n2, u2)) = units.get(first + 1) {
        let rest = (secs % n) / n2;
        if rest > 0 {
            out.push_str(&format!(" {rest}{u2}"));
        }
    }
    out
}

/// "in 1d 23h" or "2h 5m ago", from `now`.
fn relative(t: SystemTime, now: SystemTime, short: bool) -> String {
    let f = if short { age } else { span };
    match t.duration_since(now) {
        Ok(ahead) => format!("in {}", f(ahead)),
        Err(e) => format!("{} ago", f(e.duration())),
    }
}

/// Where a process runs, in one word: namespace/pod/container, unit, or container id.
fn place(p: &Value) -> String {
    match (
        p["namespace"].as_str(),
        p["pod"].as_str(),
        p["container"].as_str(),
    ) {
        (Some(ns), Some(pod), Some(c)) => format!("{ns}/{pod}/{c}"),
        (Some(ns), Some(pod), None) => format!("{ns}/{pod}"),
        _ => p["unit"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| {
                p["container_id"]
                    .as_str()
                    .map(|id| id[..id.len().min(12)].to_owned())
            })
            .unwrap_or_else(|| "host".into()),
    }
}

fn drifted(f: &Value) -> bool {
    matches!(s(&f["verdict"]), "stale" | "expired_in_memory")
}

fn verdict_rank(v: &str) -> u8 {
    match v {
        "expired_in_memory" => 3,
        "stale" => 2,
        "unverified" => 1,
        _ => 0,
    }
}

/// Worst first: what needs a restart most urgently heads the list (live before exited,
/// then the verdict, the nearest expiry, the oldest drift, the pid).
fn by_urgency(processes: &Value) -> Vec<&Value> {
    let mut rows: Vec<&Value> = list(processes).iter().collect();
    rows.sort_by_key(|p| {
        (
            !p["exited_at"].is_null(),
            Reverse(verdict_rank(s(&p["verdict"]))),
            earliest_expiry(p)
                .unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into())),
            time(&p["stale_since"]).unwrap_or(SystemTime::now() + Duration::from_secs(86400 * 365)),
            p["pid"].as_u64().unwrap_or(0),
        )
    });
    rows
}

fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `processes` table at `now`; `wide` adds who runs it, what, and which files drifted.
pub fn table(processes: &Value, now: SystemTime, wide: bool) -> String {
    let mut header: Vec<String> = [
        "PID",
        "COMM",
        "VERDICT",
        "STALE FOR",
        "EXPIRES",
        "WHERE",
        "FILES",
    ]
    .map(String::from)
    .into();
    if wide {
        header.extend(["UID", "ORIGIN", "STALE SINCE", "EXE", "DRIFTED"].map(String::from));
    }
    let mut rows = vec![header];
    for p in by_urgency(processes) {
        let files = list(&p["files"]);
        let mut verdict = s(&p["verdict"]).to_owned();
        if let Some(t) = time(&p["exited_at"]) {
            verdict.push_str(&format!(
                " (exited {} ago)",
                age(now.duration_since(t).unwrap_or_default())
            ));
        }
        let mut row = vec![
            p["pid"].to_string(),
            s(&p["comm"]).to_owned(),
            verdict,
            time(&p["stale_since"])
                .map(|t| age(now.duration_since(t).unwrap_or_default()))
                .unwrap_or_else(|| "-".into()),
            earliest_expiry(p)
                .map(|t| relative(t, now, true))
                .unwrap_or_else(|| "-".into()),
            place(p),
            if files.is_empty() {
                "-".into()
            } else {
                format!(
                    "{}/{} drifted",
                    files.iter().filter(|f| drifted(f)).count(),
                    files.len()
                )
            },
        ];
        if wide {
            let paths: Vec<&str> = files
                .iter()
                .filter(|f| drifted(f))
                .map(|f| s(&f["path"]))
                .collect();
            row.extend([
                p["uid"].to_string(),
                s(&p["origin"]).to_owned(),
                p["stale_since"].as_str().unwrap_or("-").to_owned(),
                p["exe"].as_str().unwrap_or("-").to_owned(),
                if paths.is_empty() {
                    "-".into()
                } else {
                    paths.join(",")
                },
            ]);
        }
        rows.push(row);
    }
    align(&rows)
}

/// How many certificates of a long list `explain` shows unless asked for all.
pub const SHOWN: usize = 5;

fn cert_line(c: &Value) -> String {
    format!(
        "      - {} (sha256 {}…, serial {}, expires {})",
        s(&c["subject"]),
        &s(&c["sha256"])[..s(&c["sha256"]).len().min(16)],
        s(&c["serial"]),
        s(&c["not_after"])
    )
}

/// The first few of a list of certificates, then "and N more".
fn cert_lines(certs: &[Value], all: bool) -> Vec<String> {
    let shown = if all || certs.len() <= SHOWN + 1 {
        certs.len()
    } else {
        SHOWN
    };
    let mut out: Vec<String> = certs[..shown].iter().map(cert_line).collect();
    if shown < certs.len() {
        out.push(format!(
            "      … and {} more (`trustdrift explain --all` lists every one)",
            certs.len() - shown
        ));
    }
    out
}

fn version_line(label: &str, v: &Value, at: Option<&str>) -> String {
    if v.is_null() {
        return format!("    {label}: nothing (the file could not be read)");
    }
    let sha = s(&v["sha256"]);
    format!(
        "    {label}{}: {} with {} certificate(s), sha256 {}…",
        at.map(|t| format!(" at {t}")).unwrap_or_default(),
        s(&v["format"]).replace('_', " "),
        v["certificates"],
        &sha[..sha.len().min(16)]
    )
}

/// "holds a certificate that expires in 1d 23h; a renewed one is on disk since …".
fn expiring_line(e: &Value, now: SystemTime) -> String {
    let held = &e["certificate"];
    let renewal = &e["renewed_by"];
    let what = if held["is_ca"] == true {
        "a CA certificate"
    } else {
        "a certificate"
    };
    let when = match time(&held["not_after"]) {
        Some(t) if t > now => format!(
            "expires in {}",
            span(t.duration_since(now).unwrap_or_default())
        ),
        Some(t) => format!(
            "EXPIRED {} ago",
            span(now.duration_since(t).unwrap_or_default())
        ),
        None => "expires at an unknown time".into(),
    };
    format!(
        "    It holds {what} that {when}; a renewed one is on disk since {}.\n      \
         held:    {} (not after {}, sha256 {}…)\n      \
         renewal: same subject and {}, not after {} (sha256 {}…)",
        s(&renewal["on_disk_since"]),
        s(&held["subject"]),
        s(&held["not_after"]),
        &s(&held["sha256"])[..s(&held["sha256"]).len().min(16)],
        if s(&renewal["matched_by"]) == "same_key" {
            "key"
        } else {
            "issuer"
        },
        s(&renewal["not_after"]),
        &s(&renewal["sha256"])[..s(&renewal["sha256"]).len().min(16)],
    )
}

/// `explain`: the verdict on one process at `now`, in words, with what to do; `all`: every
/// certificate of long lists.
pub fn explain(p: &Value, now: SystemTime, all: bool) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "Process {} ({}{}), started {}, {}.",
        p["pid"],
        s(&p["comm"]),
        p["exe"]
            .as_str()
            .map(|e| format!(", {e}"))
            .unwrap_or_default(),
        p["start_time"].as_str().unwrap_or("at an unknown time"),
        match place(p).as_str() {
            "host" => "on the host".to_owned(),
            where_ => format!("in {where_}"),
        }
    ));
    if let Some(t) = p["exited_at"].as_str() {
        out.push(format!(
            "It exited at {t}; it is kept for a while for the record."
        ));
    }
    let verdict = s(&p["verdict"]);
    let stale_for = time(&p["stale_since"])
        .map(|t| format!(" (for {})", span(now.duration_since(t).unwrap_or_default())))
        .unwrap_or_default();
    out.push(match verdict {
        "fresh" => "Verdict: FRESH. Every trust file it read is what is on disk now.".into(),
        "stale" => format!(
            "Verdict: STALE since {}{stale_for}. It trusts (or presents) what is no longer on disk.",
            s(&p["stale_since"])
        ),
        "expired_in_memory" => format!(
            "Verdict: EXPIRED IN MEMORY (stale since {}{stale_for}). It holds a certificate that \
             has expired while its renewal is on disk.",
            s(&p["stale_since"])
        ),
        "unverified" => format!(
            "Verdict: UNVERIFIED. It was running before trustdrift started and uses TLS ({}), \
             and its CA store changed after it started. Nothing says which trust files it \
             read or when, so it is not counted as stale; restarting (or reloading) it \
             removes the doubt.",
            p["tls_library"].as_str().unwrap_or("a TLS library")
        ),
        other => format!("Verdict: {other}."),
    });
    for f in list(&p["files"]) {
        out.push(String::new());
        let kind = if s(&f["kind"]) == "identity" {
            "its identity (certificate or key)"
        } else {
            "a CA store"
        };
        let resolved = f["resolved"]
            .as_str()
            .filter(|r| *r != s(&f["path"]))
            .map(|r| format!(", which leads to {r}"))
            .unwrap_or_default();
        out.push(format!(
            "  {} ({kind}{resolved}): {}",
            s(&f["path"]),
            s(&f["verdict"])
        ));
        out.push(version_line(
            "it read",
            &f["read_version"],
            f["read_at"].as_str(),
        ));
        if s(&f["verdict"]) != "fresh" {
            out.push(version_line(
                "on disk now",
                &f["current_version"],
                f["current_version"]["since"].as_str(),
            ));
        }
        let expiring = list(&f["expiring_in_memory"]);
        out.extend(expiring.iter().map(|e| expiring_line(e, now)));
        let missing = list(&f["missing_cas"]);
        if !missing.is_empty() {
            out.push(format!(
                "    CAs on disk that it does not trust yet ({}):",
                missing.len()
            ));
            out.extend(cert_lines(missing, all));
        }
        let removed = list(&f["removed_cas_trusted"]);
        if !removed.is_empty() {
            let expired = removed
                .iter()
                .filter(|c| time(&c["not_after"]).is_some_and(|t| t < now))
                .count();
            out.push(format!(
                "    CAs removed from disk that it STILL TRUSTS ({}{}) — a security risk:",
                removed.len(),
                match expired {
                    0 => String::new(),
                    n if n == removed.len() => ", all of them expired".into(),
                    n => format!(", {n} of them expired"),
                }
            ));
            out.extend(cert_lines(removed, all));
        }
        // A daemon that names no renewals (an older version) still lists what expired.
        let expired = list(&f["expired_in_memory"]);
        if expiring.is_empty() && !expired.is_empty() {
            out.push(format!(
                "    Certificates it holds that have EXPIRED ({}), while a renewed one is on disk:",
                expired.len()
            ));
            out.extend(cert_lines(expired, all));
        }
        if let Some(note) = f["note"].as_str() {
            out.push(format!("    note: {note}"));
        }
    }
    if verdict == "stale" || verdict == "expired_in_memory" {
        let deadline = earliest_expiry(p)
            .filter(|t| *t > now)
            .map(|t| {
                format!(
                    " Do it before {} (in {}), when the certificate it holds expires.",
                    humantime::format_rfc3339_millis(t),
                    span(t.duration_since(now).unwrap_or_default())
                )
            })
            .unwrap_or_default();
        out.push(String::new());
        out.push(format!(
            "What to do: make {} re-read its trust material: send the reload signal it \
             supports (often SIGHUP), or restart it{}. trustdrift shows it fresh as soon as it \
             re-reads.{deadline}",
            s(&p["comm"]),
            match (p["namespace"].as_str(), p["pod"].as_str()) {
                (Some(ns), Some(_)) =>
                    format!(" (e.g. kubectl -n {ns} rollout restart <its workload>)"),
                _ => p["unit"]
                    .as_str()
                    .map(|u| format!(" (systemctl reload-or-restart {u})"))
                    .unwrap_or_default(),
            }
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> SystemTime {
        humantime::parse_rfc3339(t).unwrap()
    }

    const NOW: &str = "2026-11-27T22:01:02.000Z";

    fn ca(n: usize) -> Value {
        serde_json::json!({"subject": format!("CN=Root {n}"), "sha256": "ef".repeat(32),
                           "serial": "01", "not_after": "2036-01-01T00:00:00.000Z", "is_ca": true})
    }

    fn sample() -> Value {
        serde_json::json!([{
            "pid": 4242, "comm": "python3", "exe": "/usr/bin/python3.11", "uid": 0,
            "origin": "observed",
            "start_time": "2026-11-23T17:58:30.000Z", "verdict": "stale",
            "stale_since": "2026-11-23T18:01:02.000Z", "namespace": "payments", "pod": "agent-1",
            "container": "agent", "exited_at": null, "unit": null,
            "files": [{
                "path": "/usr/lib/ssl/cert.pem", "resolved": "/etc/ssl/certs/ca-certificates.crt",
                "kind": "ca", "verdict": "stale", "read_at": "2026-11-23T17:58:30.100Z",
                "read_version": {"sha256": "ab".repeat(32), "format": "pem_bundle", "certificates": 144},
                "current_version": {"sha256": "cd".repeat(32), "format": "pem_bundle", "certificates": 145,
                                    "since": "2026-11-23T18:01:02.000Z"},
                "missing_cas": [{"subject": "CN=New Internal CA", "sha256": "ef".repeat(32),
                                 "serial": "01", "not_after": "2036-01-01T00:00:00.000Z"}],
                "removed_cas_trusted": [], "expiring_in_memory": [], "expired_in_memory": [],
                "note": null
            }]
        }])
    }

    /// An s_server-like process holding a leaf that expires at `not_after`, renewed on disk.
    fn holder(pid: u64, not_after: &str) -> Value {
        serde_json::json!({
            "pid": pid, "comm": "openssl", "exe": "/usr/bin/openssl", "uid": 0, "origin": "observed",
            "start_time": "2026-11-27T20:00:00.000Z", "verdict": "stale",
            "stale_since": "2026-11-27T21:00:00.000Z", "exited_at": null, "unit": null,
            "files": [{
                "path": "/etc/tls/tls.crt", "resolved": null, "kind": "identity", "verdict": "stale",
                "read_at": "2026-11-27T20:00:00.000Z",
                "read_version": {"sha256": "ab".repeat(32), "format": "pem_bundle", "certificates": 1},
                "current_version": {"sha256": "cd".repeat(32), "format": "pem_bundle", "certificates": 1,
                                    "since": "2026-11-27T21:00:00.000Z"},
                "missing_cas": [], "removed_cas_trusted": [], "expired_in_memory": [],
                "expiring_in_memory": [{
                    "certificate": {"subject": "CN=proxy.internal", "sha256": "01".repeat(32),
                                    "serial": "0a", "not_after": not_after, "is_ca": false},
                    "renewed_by": {"subject": "CN=proxy.internal", "sha256": "02".repeat(32),
                                   "serial": "0b", "not_after": "2027-02-25T20:00:00.000Z",
                                   "is_ca": false, "matched_by": "same_issuer",
                                   "on_disk_since": "2026-11-27T21:00:00.000Z"}
                }],
                "note": null
            }]
        })
    }

    #[test]
    fn ages_read_as_kubectl_writes_them() {
        let cases = [
            (45, "45s"),
            (119, "119s"),
            (330, "5m30s"),
            (600, "10m"),
            (2 * 3600 + 5 * 60, "125m"),
            (5 * 3600 + 3 * 60, "5h3m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (7 * 86400, "7d"),
            (400 * 86400, "400d"),
            (800 * 86400, "2y70d"),
        ];
        for (secs, want) in cases {
            assert_eq!(age(Duration::from_secs(secs)), want, "{secs}s");
        }
        assert_eq!(span(Duration::from_secs(86400 + 23 * 3600 + 59)), "1d 23h");
        assert_eq!(span(Duration::from_secs(2 * 86400)), "2d");
        assert_eq!(span(Duration::from_secs(5 * 3600 + 3 * 60 + 7)), "5h 3m");
        assert_eq!(span(Duration::from_secs(42)), "42s");
        assert_eq!(span(Duration::ZERO), "0s");
    }

    #[test]
    fn the_table_lists_worst_first_with_how_long_stale_and_when_a_held_certificate_expires() {
        let mut list = sample();
        let arr = list.as_array_mut().unwrap();
        arr.push(holder(7, "2026-11-29T21:01:02.000Z"));
        arr.push(
            serde_json::json!({"pid": 1, "comm": "sshd", "verdict": "fresh",
            "stale_since": null, "exited_at": null, "files": []}),
        );
        let t = table(&list, at(NOW), false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("PID") && lines[0].contains("STALE FOR"),
            "{t}"
        );
        assert!(lines[0].contains("EXPIRES"), "{t}");
        // The holder of a certificate expiring in 1d 23h comes first, then the older drift.
        assert!(
            lines[1].starts_with("7 ") && lines[1].contains("in 47h"),
            "{t}"
        );
        assert!(lines[1].contains("61m"), "{t}");
        assert!(
            lines[2].starts_with("4242") && lines[2].contains("4d4h"),
            "{t}"
        );
        assert!(lines[2].contains("payments/agent-1/agent") && lines[2].contains("1/1 drifted"));
        assert!(
            lines[3].starts_with("1 ") && lines[3].contains("fresh"),
            "{t}"
        );

        let wide = table(&list, at(NOW), true);
        let first = wide.lines().nth(1).unwrap();
        assert!(
            first.contains("/usr/bin/openssl") && first.contains("/etc/tls/tls.crt"),
            "{wide}"
        );
        assert!(first.contains("2026-11-27T21:00:00.000Z"), "{wide}");
    }

    #[test]
    fn exit_statuses_follow_the_alerts() {
        let now = at(NOW);
        assert_eq!(status(&serde_json::json!([]), now), Status::Ok);
        assert_eq!(status(&sample(), now), Status::Stale);
        // Its held certificate expires in 47 h: stale, a warning.
        let later = holder(7, "2026-11-29T21:01:02.000Z");
        assert_eq!(status_of(&later, now), Status::Stale);
        // Within a day, or expired: an outage now or soon.
        let soon = holder(8, "2026-11-28T10:00:00.000Z");
        assert_eq!(status_of(&soon, now), Status::Critical);
        let mut expired = holder(9, "2026-11-27T10:00:00.000Z");
        expired["verdict"] = "expired_in_memory".into();
        assert_eq!(status_of(&expired, now), Status::Critical);
        assert_eq!(
            status(&serde_json::json!([later, expired]), now),
            Status::Critical
        );
        // Exited processes need no restart; unverified ones are a hint.
        let mut gone = holder(10, "2026-11-27T10:00:00.000Z");
        gone["exited_at"] = "2026-11-27T11:00:00.000Z".into();
        assert_eq!(status_of(&gone, now), Status::Ok);
        assert_eq!(
            status_of(
                &serde_json::json!({"verdict": "unverified", "exited_at": null}),
                now
            ),
            Status::Ok
        );
        assert_eq!(
            [Status::Ok, Status::Stale, Status::Critical, Status::Unknown].map(Status::code),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn queries_ask_for_live_processes_unless_all_and_encode_their_filters() {
        assert_eq!(Query::default().path(), "/processes?exited=false");
        assert_eq!(
            Query {
                all: true,
                ..Query::default()
            }
            .path(),
            "/processes"
        );
        let q = Query {
            all: true,
            namespace: Some("payments".into()),
            pod: Some("agent 1&x".into()),
            container: Some("agent".into()),
            comm: Some("python3".into()),
            verdict: Some("stale".into()),
        };
        assert_eq!(
            q.path(),
            "/processes?verdict=stale&namespace=payments&pod=agent+1%26x&container=agent&comm=python3"
        );
    }

    #[test]
    fn explain_says_which_file_what_changed_and_what_to_do() {
        let text = explain(&sample()[0], at(NOW), false);
        assert!(
            text.contains("STALE since 2026-11-23T18:01:02.000Z (for 4d 4h)"),
            "{text}"
        );
        assert!(text.contains(
            "/usr/lib/ssl/cert.pem (a CA store, which leads to /etc/ssl/certs/ca-certificates.crt)"
        ));
        assert!(text.contains("CN=New Internal CA"));
        assert!(text.contains("kubectl -n payments rollout restart"));
    }

    #[test]
    fn explain_says_when_a_held_certificate_expires_and_since_when_its_renewal_is_on_disk() {
        let text = explain(&holder(7, "2026-11-29T21:01:02.000Z"), at(NOW), false);
        assert!(
            text.contains(
                "It holds a certificate that expires in 1d 23h; a renewed one is on disk since \
                 2026-11-27T21:00:00.000Z."
            ),
            "{text}"
        );
        assert!(text.contains("same subject and issuer"), "{text}");
        assert!(
            text.contains("Do it before 2026-11-29T21:01:02.000Z (in 1d 23h)"),
            "{text}"
        );
        let text = explain(&holder(7, "2026-11-27T19:00:00.000Z"), at(NOW), false);
        assert!(
            text.contains("that EXPIRED 3h 1m ago; a renewed one"),
            "{text}"
        );
    }

    #[test]
    fn explain_summarises_long_ca_lists_unless_asked_for_all() {
        let mut p = sample()[0].clone();
        p["files"][0]["removed_cas_trusted"] = (0..146).map(ca).collect::<Vec<_>>().into();
        let text = explain(&p, at(NOW), false);
        assert!(text.contains("STILL TRUSTS (146)"), "{text}");
        assert!(
            text.contains("CN=Root 4") && !text.contains("CN=Root 5 "),
            "{text}"
        );
        assert!(
            text.contains("… and 141 more (`trustdrift explain --all`"),
            "{text}"
        );
        let all = explain(&p, at(NOW), true);
        assert!(
            all.contains("CN=Root 145") && !all.contains("more ("),
            "{all}"
        );
        // One more than the few is shown rather than summarised as "and 1 more".
        p["files"][0]["removed_cas_trusted"] = (0..6).map(ca).collect::<Vec<_>>().into();
        assert!(explain(&p, at(NOW), false).contains("CN=Root 5"));
    }

    #[test]
    fn chunked_bodies_are_reassembled() {
        assert_eq!(
            decode_body(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
                "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            ),
            "abcde"
        );
    }
}
