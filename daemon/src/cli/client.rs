//! The command-line face of the API: `trustdrift processes` (a table, like `kubectl
//! get`) and `trustdrift explain <pid>` (the verdict in words). Both ask the local
//! daemon over its API, TCP or unix socket.

use std::{
    io::{Read, Write},
    time::Duration,
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

/// The `processes` table.
pub fn table(processes: &Value) -> String {
    let mut rows = vec![[
        "PID".to_owned(),
        "COMM".into(),
        "VERDICT".into(),
        "STALE SINCE".into(),
        "WHERE".into(),
        "FILES".into(),
    ]];
    for p in processes.as_array().map(Vec::as_slice).unwrap_or_default() {
        let files = p["files"].as_array().map(Vec::as_slice).unwrap_or_default();
        let drifted = files
            .iter()
            .filter(|f| s(&f["verdict"]) == "stale" || s(&f["verdict"]) == "expired_in_memory")
            .count();
        let mut verdict = s(&p["verdict"]).to_owned();
        if !p["exited_at"].is_null() {
            verdict.push_str(" (exited)");
        }
        rows.push([
            p["pid"].to_string(),
            s(&p["comm"]).to_owned(),
            verdict,
            p["stale_since"].as_str().unwrap_or("-").to_owned(),
            place(p),
            if files.is_empty() {
                "-".into()
            } else {
                format!("{drifted}/{} drifted", files.len())
            },
        ]);
    }
    let widths: Vec<usize> = (0..6)
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

fn cert_line(c: &Value) -> String {
    format!(
        "      - {} (sha256 {}…, serial {}, expires {})",
        s(&c["subject"]),
        &s(&c["sha256"])[..s(&c["sha256"]).len().min(16)],
        s(&c["serial"]),
        s(&c["not_after"])
    )
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

/// `explain`: the verdict on one process, in words, with what to do.
pub fn explain(p: &Value) -> String {
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
    out.push(match verdict {
        "fresh" => "Verdict: FRESH. Every trust file it read is what is on disk now.".into(),
        "stale" => format!(
            "Verdict: STALE since {}. It trusts (or presents) what is no longer on disk.",
            s(&p["stale_since"])
        ),
        "expired_in_memory" => format!(
            "Verdict: EXPIRED IN MEMORY (stale since {}). It holds a certificate that has \
             expired while a renewed one is on disk.",
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
    for f in p["files"].as_array().map(Vec::as_slice).unwrap_or_default() {
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
        let list = |key: &str| f[key].as_array().cloned().unwrap_or_default();
        let missing = list("missing_cas");
        if !missing.is_empty() {
            out.push(format!(
                "    CAs on disk that it does not trust yet ({}):",
                missing.len()
            ));
            out.extend(missing.iter().map(cert_line));
        }
        let removed = list("removed_cas_trusted");
        if !removed.is_empty() {
            out.push(format!(
                "    CAs removed from disk that it STILL TRUSTS ({}) — a security risk:",
                removed.len()
            ));
            out.extend(removed.iter().map(cert_line));
        }
        let expired = list("expired_in_memory");
        if !expired.is_empty() {
            out.push(format!(
                "    Certificates it holds that have EXPIRED ({}), while a newer one is on disk:",
                expired.len()
            ));
            out.extend(expired.iter().map(cert_line));
        }
        if let Some(note) = f["note"].as_str() {
            out.push(format!("    note: {note}"));
        }
    }
    if verdict == "stale" || verdict == "expired_in_memory" {
        out.push(String::new());
        out.push(format!(
            "What to do: make {} re-read its trust material: send the reload signal it \
             supports (often SIGHUP), or restart it{}. trustdrift shows it fresh as soon as it \
             re-reads.",
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

    fn sample() -> Value {
        serde_json::json!([{
            "pid": 4242, "comm": "python3", "exe": "/usr/bin/python3.11",
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
                "removed_cas_trusted": [], "expired_in_memory": [], "note": null
            }]
        }])
    }

    #[test]
    fn the_table_has_one_row_per_process() {
        let t = table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PID"));
        assert!(lines[1].contains("python3") && lines[1].contains("payments/agent-1/agent"));
        assert!(lines[1].contains("1/1 drifted"));
    }

    #[test]
    fn explain_says_which_file_what_changed_and_what_to_do() {
        let text = explain(&sample()[0]);
        assert!(
            text.contains("STALE since 2026-11-23T18:01:02.000Z"),
            "{text}"
        );
        assert!(text.contains(
            "/usr/lib/ssl/cert.pem (a CA store, which leads to /etc/ssl/certs/ca-certificates.crt)"
        ));
        assert!(text.contains("CN=New Internal CA"));
        assert!(text.contains("kubectl -n payments rollout restart"));
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
