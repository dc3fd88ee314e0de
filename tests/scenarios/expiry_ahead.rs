//! Expiry ahead, and what is not an outage.
//!
//! 1. A server that cannot reload (`openssl s_server`) holds a 2-day leaf; cert-manager
//!    writes its 90-day renewal over the files. Nothing is down yet, but in under two days
//!    it will be: `/metrics` carries the old leaf's notAfter for the server's group (the
//!    gauge the shipped rules warn on at 7 days and page on at 1), `/processes/{pid}`
//!    names the held certificate and its renewal, and `trustdrift explain` says "holds a
//!    certificate that expires in 1d 23h; a renewed one is on disk since …". After the
//!    restart the series goes.
//! 2. A `ca-certificates` upgrade drops the roots of the machine's bundle that have
//!    expired: a process that loaded the bundle is stale (it lacks what changed), but
//!    nothing it holds was renewed and nothing is down: no expired-in-memory series, no
//!    expiry series, nothing that pages.
//!
//! Each daemon sees every process on the machine, and other scenarios run `openssl` and
//! `python3` servers whose certificates expire on purpose: the programs here run under
//! names of their own (a symlink to the real binary sets the command name), so their
//! groups are theirs alone.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use trustdrift_e2e::{
    Cert, Daemon, Guarded, Reloading, TLS_AGENT, TempDir, Value, free_port, python3,
    replace_atomically, trustdrift_bin,
};

use crate::support::{file, noticed, require, series, shas};

const EXPIRATION: &str = "trustdrift_stale_certificate_expiration_timestamp_seconds";
const SERVER_NAME: &str = "expiring.internal";
const DAY: Duration = Duration::from_secs(86400);

/// `program` (a path, or a name on PATH) as `dir/name`: run through the link, its
/// command name is `name`, its executable still the real one.
fn named(dir: &Path, program: &Path, name: &str) -> PathBuf {
    let real = if program.is_absolute() {
        program.to_path_buf()
    } else {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {}", program.display())])
            .output()
            .expect("sh");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let link = dir.join(name);
    symlink(&real, &link).expect("linking the program under its own name");
    link
}

/// `openssl s_server` (run as `openssl`) on loopback `port`: loads its certificate once and
/// can never reload it. Returned once it listens.
fn s_server(openssl: &Path, port: u16, cert: &Path, key: &Path) -> Guarded {
    let server = Guarded::spawn(
        Command::new(openssl)
            .args([
                "s_server",
                "-www",
                "-no-CAfile",
                "-no-CApath",
                "-no-CAstore",
            ])
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        thread::sleep(Duration::from_millis(50));
    }
    server
}

/// The SHA-256 fingerprint of the certificate a real client is served on `port`.
fn served(port: u16) -> Option<String> {
    let client = format!(
        "timeout 5 openssl s_client -connect 127.0.0.1:{port} -servername {SERVER_NAME} \
         </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
    );
    let out = Command::new("sh").args(["-c", &client]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, hex) = text.trim().split_once('=')?;
    Some(hex.replace(':', "").to_lowercase())
}

/// What openssl (not the daemon) says of a PEM certificate: (sha256, notAfter, expired).
fn inspect(pem: &str) -> (String, SystemTime, bool) {
    let mut child = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-enddate",
            "-dateopt",
            "iso_8601",
            "-checkend",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(pem.as_bytes()).expect("writing to openssl");
    }
    let out = child.wait_with_output().expect("openssl x509");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in openssl's output: {text}"))
            .to_owned()
    };
    let sha256 = field("sha256 Fingerprint=").replace(':', "").to_lowercase();
    // "notAfter=2026-11-23 18:40:00Z"
    let date = field("notAfter=").replace(' ', "T");
    let not_after = humantime::parse_rfc3339(&date).unwrap_or_else(|e| panic!("{date}: {e}"));
    // -checkend 0: status 1 when it has expired.
    (sha256, not_after, !out.status.success())
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The value of a series line.
fn value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {line}"))
}

/// `trustdrift <args> --api` this daemon: (exit code, stdout).
fn cli(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let out = Command::new(trustdrift_bin())
        .args(args)
        .arg("--api")
        .arg(format!("127.0.0.1:{}", daemon.port))
        .output()
        .expect("running the trustdrift CLI");
    (
        out.status.code().expect("an exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Waits until `/metrics` satisfies `pred`; panics with the last text.
fn metrics_until(daemon: &Daemon, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = daemon.metrics();
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "/metrics never {what}:\n{text}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_holding_a_two_day_leaf_whose_renewal_landed_is_shown_expiring_until_restarted() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("openssl", "openssl");
    let scenario = "expiry-ahead/two-day-leaf";
    let comm = "td-expiring-srv";
    let dir = TempDir::new("expiry-ahead");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = Cert::ca("Expiry Ahead Issuing CA");
    let old = ca.leaf(SERVER_NAME, 2 * DAY);
    let (old_sha, old_not_after, _) = inspect(&old.pem);
    assert_eq!(old_sha, old.sha256);
    fs::write(&cert, &old.pem).unwrap();
    fs::write(&key, &old.key_pem).unwrap();
    let openssl = named(dir.path(), Path::new("openssl"), comm);
    let port = free_port();
    let server = s_server(&openssl, port, &cert, &key);
    let pid = server.pid();
    let p = daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");
    assert_eq!(p["comm"], comm, "{}", pretty(&p));
    assert!(
        !daemon.metrics().contains(&format!("comm=\"{comm}\"")),
        "nothing renewed yet, nothing exported"
    );

    // cert-manager renews for 90 days (a new key, the same issuer): key, then certificate,
    // each renamed into place.
    let renewed = ca.leaf(SERVER_NAME, 90 * DAY);
    replace_atomically(&key, &renewed.key_pem);
    replace_atomically(&cert, &renewed.pem);
    let since = Instant::now();
    let cert_path = path_str(&cert);
    let p = noticed(
        &daemon,
        scenario,
        "stale, renewal on disk",
        pid,
        since,
        |p| {
            p["verdict"] == "stale"
                && file(p, cert_path)["expiring_in_memory"]
                    .as_array()
                    .is_some_and(|l| !l.is_empty())
        },
    );

    // The API names what it holds and what replaced it.
    let (status, one) = daemon.get(&format!("/processes/{pid}"));
    assert_eq!(status, 200, "{one}");
    let f = file(&one, cert_path);
    let expiring = f["expiring_in_memory"].as_array().expect("a list");
    assert_eq!(expiring.len(), 1, "{}", pretty(&one));
    let e = &expiring[0];
    assert_eq!(e["certificate"]["sha256"], old.sha256, "{}", pretty(&one));
    assert_eq!(
        e["certificate"]["not_after"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok()),
        Some(old_not_after),
        "the daemon's notAfter is openssl's: {}",
        pretty(&one)
    );
    assert_eq!(
        e["renewed_by"]["sha256"],
        renewed.sha256,
        "{}",
        pretty(&one)
    );
    assert_eq!(e["renewed_by"]["matched_by"], "same_issuer");
    assert_eq!(
        e["renewed_by"]["on_disk_since"],
        f["current_version"]["since"],
        "the renewal landed with the version on disk now: {}",
        pretty(&one)
    );
    assert!(shas(&f["expired_in_memory"]).is_empty(), "not expired yet");
    assert_eq!(f["verdict"], "stale");
    assert_eq!(p["verdict"], "stale");
    // And the server really still serves the old leaf.
    assert_eq!(served(port).as_deref(), Some(old.sha256.as_str()));

    // /metrics: the old leaf's notAfter, under the server's group.
    let labels = [
        "kind=\"identity\"",
        "confidence=\"observed\"",
        "namespace=\"\"",
        "pod=\"\"",
        "container=\"\"",
        &format!("comm=\"{comm}\""),
    ];
    let text = metrics_until(&daemon, "carried the expiry", |t| {
        !series(t, EXPIRATION, &labels).is_empty()
    });
    let found = series(&text, EXPIRATION, &labels);
    assert_eq!(found.len(), 1, "{text}");
    assert_eq!(value(found[0]), unix(old_not_after), "{}", found[0]);
    let stale = series(&text, "trustdrift_stale_processes", &labels);
    assert_eq!(stale.len(), 1, "the same group is stale: {text}");
    assert!(
        series(
            &text,
            "trustdrift_expired_in_memory_processes",
            &[&format!("comm=\"{comm}\"")]
        )
        .is_empty(),
        "{text}"
    );

    // explain, in words, and a status a node check reads: stale, not (yet) critical.
    let (code, out) = cli(&daemon, &["explain", &pid.to_string()]);
    let on_disk_since = e["renewed_by"]["on_disk_since"].as_str().unwrap();
    assert!(
        out.contains(&format!(
            "It holds a certificate that expires in 1d 23h; a renewed one is on disk since \
             {on_disk_since}."
        )),
        "{out}"
    );
    assert_eq!(code, 1, "{out}");
    let (code, out) = cli(&daemon, &["processes", "--comm", comm]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("in 47h"), "{out}");

    // The only remedy for s_server: a new process on the same port. It reads the renewal,
    // and the old one's series goes with it.
    let since = Instant::now();
    drop(server);
    let server = s_server(&openssl, port, &cert, &key);
    noticed(
        &daemon,
        scenario,
        "fresh after restart",
        server.pid(),
        since,
        |p| p["verdict"] == "fresh",
    );
    metrics_until(&daemon, "dropped the series", |t| {
        series(t, EXPIRATION, &[&format!("comm=\"{comm}\"")]).is_empty()
    });
    assert_eq!(served(port).as_deref(), Some(renewed.sha256.as_str()));
    assert_eq!(cli(&daemon, &["processes", "--comm", comm]).0, 0);
}

/// The PEM certificates of a bundle, each with its END line.
fn pem_blocks(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

/// A self-signed root that expired yesterday.
fn expired_root() -> String {
    Cert::expired_ca("trustdrift Expired Test Root", DAY).pem
}

#[test]
fn a_ca_certificates_upgrade_that_drops_expired_roots_is_stale_and_pages_nobody() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("python3", "python3");
    require("openssl", "openssl");
    let scenario = "expiry-ahead/upgrade-drops-expired-roots";
    let comm = "td-bundle-agent";
    let system = fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").expect(
        "the system bundle: apt-get install -y ca-certificates (cargo xtask setup installs it)",
    );
    let mut blocks = pem_blocks(&system);
    assert!(blocks.len() > 100, "{} certificates", blocks.len());
    let mut expired: Vec<(String, String)> = blocks
        .iter()
        .map(|b| (b.clone(), inspect(b)))
        .filter(|(_, (_, _, expired))| *expired)
        .map(|(b, (sha, _, _))| (b, sha))
        .collect();
    eprintln!(
        "scenario {scenario}: {} of the machine's {} roots have expired",
        expired.len(),
        blocks.len()
    );
    if expired.is_empty() {
        // A bundle with none expired today: one is added, so that the upgrade drops one.
        let root = expired_root();
        let (sha, _, is_expired) = inspect(&root);
        assert!(is_expired);
        blocks.push(root.clone());
        expired.push((root, sha));
    }
    let initial: String = blocks.concat();
    let upgraded: String = blocks
        .iter()
        .filter(|b| !expired.iter().any(|(e, _)| e == *b))
        .cloned()
        .collect();

    let dir = TempDir::new("expiry-ahead-bundle");
    let bundle = dir.join("ca-certificates.crt");
    fs::write(&bundle, &initial).unwrap();
    let python = named(dir.path(), &python3(), comm);
    let agent = Reloading::spawn(Command::new(&python).args([
        "-I",
        "-c",
        TLS_AGENT,
        "client",
        path_str(&bundle),
    ]));
    let pid = agent.pid();
    daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");

    // What update-ca-certificates does: the new bundle renamed over the old.
    replace_atomically(&bundle, &upgraded);
    let since = Instant::now();
    let p = noticed(&daemon, scenario, "stale", pid, since, |p| {
        p["verdict"] != "fresh"
    });
    let f = file(&p, path_str(&bundle));
    assert_eq!(p["verdict"], "stale", "{}", pretty(&p));
    assert_eq!(f["verdict"], "stale", "{}", pretty(&p));
    assert!(
        f["expiring_in_memory"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "no root it holds was renewed: {}",
        pretty(&p)
    );
    assert!(shas(&f["expired_in_memory"]).is_empty(), "{}", pretty(&p));
    // Listed as removed roots that had already expired (what the process still holds,
    // though they trust nothing any more), nothing more.
    let removed = shas(&f["removed_cas_expired"]);
    for (_, sha) in &expired {
        assert!(removed.contains(sha), "{sha} not listed: {}", pretty(&p));
    }
    let trusted = shas(&f["removed_cas_trusted"]);
    assert!(
        expired.iter().all(|(_, sha)| !trusted.contains(sha)),
        "an expired root is not one the process still trusts: {}",
        pretty(&p)
    );

    // It stays that way (verdicts are re-judged as time passes; the daemon publishes its
    // health every 5 s), and nothing that pages has a series for its group.
    thread::sleep(Duration::from_secs(6));
    let p = daemon.process(pid).expect("still listed");
    assert_eq!(p["verdict"], "stale", "{}", pretty(&p));
    let group = format!("comm=\"{comm}\"");
    let text = metrics_until(&daemon, "listed the stale agent", |t| {
        !series(t, "trustdrift_stale_processes", &[&group]).is_empty()
    });
    for family in ["trustdrift_expired_in_memory_processes", EXPIRATION] {
        assert!(
            series(&text, family, &[&group]).is_empty(),
            "{family} has a series for a routine upgrade:\n{text}"
        );
    }
    // A node check says "stale" (1), not "critical" (2).
    let (code, out) = cli(&daemon, &["processes", "--comm", comm]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("stale"), "{out}");
    // The agent reloads: fresh again, and it trusts the upgraded bundle.
    agent.reload();
    daemon.wait_for("fresh after reload", pid, |p| p["verdict"] == "fresh");
}
