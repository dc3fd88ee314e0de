//! Scenario 5 — noise that must not alert: a short-lived curl, a store rewritten with
//! identical bytes, a process reading a `.pem` that is no trust material, and a process
//! that re-reads the bundle on every connection (always fresh, and cheap).

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, bundle, python_reader, replace_atomically};

use crate::support::{alone, openssl_server, require, series};

fn stale_series_for(daemon: &Daemon, comm: &str) -> usize {
    series(
        &daemon.metrics(),
        "trustdrift_stale_processes",
        &[&format!("comm=\"{comm}\"")],
    )
    .len()
}

/// An HTTPS server on loopback whose certificate `ca` signed.
fn https(dir: &std::path::Path, ca: &Cert) -> (Guarded, u16) {
    let leaf = ca.leaf("localhost", Duration::from_secs(3600));
    let (cert, key) = (dir.join("srv.crt"), dir.join("srv.key"));
    fs::write(&cert, &leaf.pem).unwrap();
    fs::write(&key, &leaf.key_pem).unwrap();
    openssl_server(&["-quiet", "-www"], &cert, &key)
}

#[test]
fn a_short_lived_curl_that_reads_the_bundle_and_exits_does_not_alert() {
    require("curl", "curl");
    let dir = TempDir::new("noise-curl");
    let ca = Cert::ca("Curl Root");
    let path = dir.join("ca.pem");
    fs::write(&path, bundle(&[&ca])).unwrap();
    let (_server, port) = https(dir.path(), &ca);
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let mut curl = Guarded::spawn(
        Command::new("curl")
            .args(["-sS", "--fail", "-o", "/dev/null", "--cacert"])
            .arg(&path)
            .arg(format!("https://localhost:{port}/"))
            .stdout(Stdio::null()),
    );
    let pid = curl.pid();
    assert!(
        curl.wait(Duration::from_secs(20)).success(),
        "a real handshake"
    );
    let p = daemon.wait_for("exited", pid, |p| !p["exited_at"].is_null());
    assert_eq!(p["comm"], "curl");
    // The bundle changes after curl is gone: nothing to alert on.
    fs::write(&path, bundle(&[&ca, &Cert::ca("Later Root")])).unwrap();
    let witness = python_reader(&path);
    daemon.wait_for("fresh", witness.pid(), |p| p["verdict"] == "fresh");
    assert_eq!(stale_series_for(&daemon, "curl"), 0);
}

#[test]
fn a_store_rewritten_with_identical_bytes_does_not_alert() {
    let dir = TempDir::new("noise-identical");
    let path = dir.join("bundle.pem");
    let content = bundle(&[&Cert::ca("Steady Root")]);
    fs::write(&path, &content).unwrap();
    let marker = dir.join("marker.pem");
    fs::write(&marker, &content).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = python_reader(&path);
    let witness = python_reader(&marker);
    daemon.wait_for("fresh", agent.pid(), |p| p["verdict"] == "fresh");
    daemon.wait_for("fresh", witness.pid(), |p| p["verdict"] == "fresh");
    // Configuration management re-applies the same file, both ways it does so.
    replace_atomically(&path, &content);
    fs::write(&path, &content).unwrap();
    let status = Command::new("touch").arg(&path).status().unwrap();
    assert!(status.success());
    // A real change after them, in the same directory: once it is noticed, they were too.
    fs::write(&marker, bundle(&[&Cert::ca("Witness Root")])).unwrap();
    daemon.wait_for("stale", witness.pid(), |p| p["verdict"] == "stale");
    assert_eq!(daemon.process(agent.pid()).unwrap()["verdict"], "fresh");
}

#[test]
fn a_process_reading_a_pem_that_is_not_trust_material_does_not_alert() {
    require("openssl", "openssl");
    let dir = TempDir::new("noise-dhparam");
    let params = dir.join("dhparam.pem");
    let generate = |group: &str| {
        let status = Command::new("openssl")
            .args(["genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt"])
            .arg(format!("group:{group}"))
            .arg("-out")
            .arg(&params)
            .status()
            .unwrap();
        assert!(status.success());
    };
    generate("ffdhe2048");
    let marker = dir.join("marker.pem");
    fs::write(&marker, bundle(&[&Cert::ca("Marker Root")])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let server = python_reader(&params);
    let witness = python_reader(&marker);
    let p = daemon.wait_for("listed", server.pid(), |p| p["verdict"] == "fresh");
    assert!(
        p["files"][0]["note"]
            .as_str()
            .unwrap_or("")
            .contains("not trust material")
    );
    daemon.wait_for("fresh", witness.pid(), |p| p["verdict"] == "fresh");
    generate("ffdhe3072");
    fs::write(&marker, bundle(&[&Cert::ca("Another Marker Root")])).unwrap();
    daemon.wait_for("stale", witness.pid(), |p| p["verdict"] == "stale");
    assert_eq!(daemon.process(server.pid()).unwrap()["verdict"], "fresh");
}

fn events_total(daemon: &Daemon) -> u64 {
    series(
        &daemon.metrics(),
        "trustdrift_events_total",
        &["kind=\"access\""],
    )
    .first()
    .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    .unwrap_or(0)
}

#[test]
fn a_process_that_rereads_the_bundle_on_every_connection_stays_fresh_and_costs_nothing() {
    let dir = TempDir::new("noise-reread");
    let ca = Cert::ca("Per Connection Root");
    // A name no default suffix matches: other daemons on the machine (other tests') do
    // not trace it, so they do not read it either (a peer's read is an event too).
    let traced = dir.join("trust");
    fs::create_dir(&traced).unwrap();
    let path = traced.join("bundle.noise");
    fs::write(&path, bundle(&[&ca])).unwrap();
    let (_server, port) = https(dir.path(), &ca);
    // Its own name, so its metric series are its own on a machine other tests share.
    let client_exe = dir.join("tdperconn");
    std::os::unix::fs::symlink("/usr/bin/python3", &client_exe).unwrap();
    let _alone = alone();
    // Only the client's directory is trust material: the events counted below are the
    // client's own, whatever other processes on the machine (other tests, other daemons)
    // open meanwhile.
    let prefix = format!("{}/", traced.display());
    let Some(daemon) = Daemon::start(&["--no-default-paths", "--prefix", &prefix]) else {
        return;
    };
    // A client that builds a new TLS context (re-reading the bundle) for every connection.
    let script = format!(
        "import socket, ssl, sys\n\
         for line in sys.stdin:\n    \
             for _ in range(int(line)):\n        \
                 ctx = ssl.create_default_context(cafile={path:?})\n        \
                 with socket.create_connection(('127.0.0.1', {port})) as raw:\n            \
                     with ctx.wrap_socket(raw, server_hostname='localhost'):\n                \
                         pass\n    \
             print('done', flush=True)",
        path = path.to_str().unwrap()
    );
    let mut client = Guarded::spawn(
        Command::new(&client_exe)
            .args(["-I", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    let mut out = BufReader::new(client.0.stdout.take().unwrap());
    let mut run = |n: u32| {
        writeln!(stdin, "{n}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done");
    };
    run(1);
    daemon.wait_for("fresh", client.pid(), |p| p["verdict"] == "fresh");
    let before = events_total(&daemon);
    run(200);
    // The store changes; the next connection re-reads it, so the client is fresh again.
    // Staged outside the traced directory and renamed in (as a rotation does): the
    // test's own write is no open of trust material.
    let next = dir.join("bundle.next");
    fs::write(&next, bundle(&[&ca, &Cert::ca("Rotated In Root")])).unwrap();
    fs::rename(&next, &path).unwrap();
    run(20);
    let p = daemon.wait_for("fresh", client.pid(), |p| {
        p["verdict"] == "fresh" && p["files"][0]["opens"].as_u64() >= Some(221)
    });
    assert_eq!(p["files"][0]["current_version"]["certificates"], 2, "{p}");
    let after = events_total(&daemon);
    // 220 re-reads cost the daemon no event of their own.
    assert_eq!(
        after - before,
        0,
        "{} events for 220 re-reads; the daemon lists {}",
        after - before,
        serde_json::to_string_pretty(&daemon.processes()).unwrap_or_default()
    );
    assert_eq!(p["comm"], "tdperconn");
    assert_eq!(stale_series_for(&daemon, "tdperconn"), 0);
}
