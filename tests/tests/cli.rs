//! `trustdrift processes` and `trustdrift explain`: the real binary against a real daemon,
//! as an SRE or a node check runs them. What it lists by default (live processes only),
//! its filters, its formats, and the exit status scripts act on: 0 nothing to do, 1
//! stale, 2 expired in memory (or expiring within a day), 3 no answer. And trustdrift's
//! own processes (the CLI, a second daemon, a copy of the binary) are never listed as
//! readers, while a process merely calling itself trustdrift is.
//!
//! The daemon sees every process on the machine: each program here runs under a command
//! name of its own (a symlink to the real python3), and the checks filter on it.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{
    Cert, Daemon, Guarded, TempDir, Value, http_get, python3, spawn_after_read, trustdrift_bin,
};

struct Ran {
    pid: u32,
    code: i32,
    stdout: String,
    stderr: String,
}

/// `trustdrift <args>` (with `--api` this daemon unless `api` says otherwise).
fn run(api: Option<String>, args: &[&str]) -> Ran {
    let mut cmd = Command::new(trustdrift_bin());
    cmd.args(args);
    if let Some(api) = api {
        cmd.arg("--api").arg(api);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the trustdrift CLI");
    let pid = child.id();
    let out = child.wait_with_output().expect("its output");
    Ran {
        pid,
        code: out.status.code().expect("an exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn api(daemon: &Daemon) -> Option<String> {
    Some(format!("127.0.0.1:{}", daemon.port))
}

/// python3 under the command name `name`.
fn named_python(dir: &Path, name: &str) -> PathBuf {
    let link = dir.join(name);
    symlink(python3(), &link).expect("linking python3 under its own name");
    link
}

/// A python3 named `name` that reads `path` once and stays.
fn reader(dir: &Path, name: &str, path: &Path) -> Guarded {
    let script = format!(
        "import sys\nopen({:?}, 'rb').read()\nprint('read', flush=True)\nsys.stdin.read()",
        path.to_str().expect("a UTF-8 path")
    );
    spawn_after_read(Command::new(named_python(dir, name)).args(["-I", "-c", &script]))
}

/// A python3 TLS server named `name` that loads its certificate and key once.
fn tls_server(dir: &Path, name: &str, cert: &Path, key: &Path) -> Guarded {
    let script = format!(
        "import ssl, sys\nctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain({:?}, {:?})\nprint('read', flush=True)\nsys.stdin.read()",
        cert.to_str().expect("a UTF-8 path"),
        key.to_str().expect("a UTF-8 path")
    );
    spawn_after_read(Command::new(named_python(dir, name)).args(["-I", "-c", &script]))
}

fn pids(rows: &str) -> Vec<u32> {
    rows.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Every process the daemon lists, exited ones included.
fn everyone(daemon: &Daemon) -> Vec<Value> {
    let (status, body) = daemon.get("/processes");
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[test]
fn processes_lists_what_needs_a_restart_now_and_exits_with_what_it_calls_for() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let dir = TempDir::new("cli");
    let root = Cert::ca("CLI Root");
    let (stale_bundle, fresh_bundle) = (dir.join("stale.pem"), dir.join("fresh.pem"));
    fs::write(&stale_bundle, &root.pem).unwrap();
    fs::write(&fresh_bundle, &root.pem).unwrap();
    let stale = reader(dir.path(), "td-cli-stale", &stale_bundle);
    let fresh = reader(dir.path(), "td-cli-fresh", &fresh_bundle);
    // A server whose certificate expires in seconds, renewed on disk meanwhile.
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let leaf = root.leaf("cli.internal", Duration::from_secs(4));
    fs::write(&cert, &leaf.pem).unwrap();
    fs::write(&key, &leaf.key_pem).unwrap();
    let expired = tls_server(dir.path(), "td-cli-expired", &cert, &key);
    // One that read and exited.
    let gone_python = named_python(dir.path(), "td-cli-gone");
    let gone = Command::new(&gone_python)
        .args([
            "-I",
            "-c",
            &format!("open({:?}, 'rb').read()", fresh_bundle.to_str().unwrap()),
        ])
        .spawn()
        .expect("python3");
    let gone_pid = gone.id();
    assert!(gone.wait_with_output().unwrap().status.success());

    for p in [&stale, &fresh, &expired] {
        daemon.wait_for("fresh", p.pid(), |p| p["verdict"] == "fresh");
    }
    daemon.wait_for("listed as exited", gone_pid, |p| p["exited_at"].is_string());
    fs::write(
        &stale_bundle,
        root.pem.clone() + &Cert::ca("CLI Added Root").pem,
    )
    .unwrap();
    fs::write(
        &cert,
        root.leaf("cli.internal", Duration::from_secs(86400)).pem,
    )
    .unwrap();
    daemon.wait_for("stale", stale.pid(), |p| p["verdict"] == "stale");
    daemon.wait_for("expired in memory", expired.pid(), |p| {
        p["verdict"] == "expired_in_memory"
    });
    let mut cli_pids = Vec::new();
    let mut cli = |args: &[&str]| {
        let ran = run(api(&daemon), args);
        cli_pids.push(ran.pid);
        ran
    };

    // By default: live processes only, worst first, with how long each has been stale.
    let all_live = cli(&["processes"]);
    let listed = pids(&all_live.stdout);
    assert!(all_live.stdout.starts_with("PID"), "{}", all_live.stdout);
    for p in [&stale, &fresh, &expired] {
        assert!(listed.contains(&p.pid()), "{}", all_live.stdout);
    }
    assert!(!listed.contains(&gone_pid), "{}", all_live.stdout);
    // Other processes on the machine may be worse, never better.
    assert!(
        all_live.code == 1 || all_live.code == 2,
        "{}",
        all_live.code
    );
    let position = |pid: u32| listed.iter().position(|p| *p == pid).unwrap();
    assert!(position(expired.pid()) < position(stale.pid()));
    assert!(position(stale.pid()) < position(fresh.pid()));

    // One process each: the status it calls for.
    let r = cli(&["processes", "--comm", "td-cli-stale"]);
    assert_eq!(
        (r.code, pids(&r.stdout)),
        (1, vec![stale.pid()]),
        "{}",
        r.stdout
    );
    let row = r.stdout.lines().nth(1).unwrap();
    assert!(row.contains("stale") && row.contains(" drifted"), "{row}");
    assert!(
        row.split_whitespace().nth(3).unwrap().ends_with('s'),
        "stale for a few seconds: {row}"
    );
    let r = cli(&["processes", "--comm", "td-cli-fresh"]);
    assert_eq!(
        (r.code, pids(&r.stdout)),
        (0, vec![fresh.pid()]),
        "{}",
        r.stdout
    );
    let r = cli(&["processes", "--comm", "td-cli-expired"]);
    assert_eq!(
        (r.code, pids(&r.stdout)),
        (2, vec![expired.pid()]),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("expired_in_memory") && r.stdout.contains(" ago"));

    // --all adds the exited; they never change the status.
    let r = cli(&["processes", "--comm", "td-cli-gone"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    assert!(r.stderr.contains("No processes"), "{}", r.stderr);
    let r = cli(&["processes", "--all", "--comm", "td-cli-gone"]);
    assert_eq!(
        (r.code, pids(&r.stdout)),
        (0, vec![gone_pid]),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("(exited"), "{}", r.stdout);

    // The API's filters, as flags.
    let r = cli(&["processes", "--verdict", "stale", "--comm", "td-cli-fresh"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    let r = cli(&["processes", "--verdict", "fresh", "--comm", "td-cli-fresh"]);
    assert_eq!(pids(&r.stdout), vec![fresh.pid()]);
    let r = cli(&["processes", "--verdict", "expired_in_memory"]);
    assert!(pids(&r.stdout).contains(&expired.pid()) && r.code == 2);
    assert!(!pids(&r.stdout).contains(&stale.pid()));
    for flag in ["--namespace", "--pod", "--container"] {
        let r = cli(&["processes", flag, "nowhere-to-be-found"]);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{flag}: {}", r.stderr);
    }

    // Formats: the API's JSON, and the wide table.
    for args in [
        &["processes", "-o", "json", "--comm", "td-cli-stale"][..],
        &["processes", "--json", "--comm", "td-cli-stale"],
    ] {
        let r = cli(args);
        let body: Value = serde_json::from_str(&r.stdout).expect("JSON");
        let list = body.as_array().expect("an array");
        assert_eq!(list.len(), 1, "{}", r.stdout);
        assert_eq!(list[0]["pid"], stale.pid());
        let files = list[0]["files"].as_array().expect("files");
        let bundle = files
            .iter()
            .find(|f| f["path"] == stale_bundle.to_str().unwrap())
            .expect("the bundle it read");
        assert_eq!(bundle["verdict"], "stale");
        assert_eq!(r.code, 1);
    }
    let r = cli(&["processes", "-o", "wide", "--comm", "td-cli-stale"]);
    let header = r.stdout.lines().next().unwrap();
    assert!(
        header.contains("EXE") && header.contains("DRIFTED"),
        "{header}"
    );
    let row = r.stdout.lines().nth(1).unwrap();
    assert!(
        row.contains(stale_bundle.to_str().unwrap()) && row.contains("python3"),
        "{row}"
    );

    // explain: the same status, for one process.
    let r = cli(&["explain", &expired.pid().to_string()]);
    assert_eq!(r.code, 2, "{}", r.stdout);
    assert!(
        r.stdout.contains("It holds a certificate that EXPIRED")
            && r.stdout.contains("a renewed one is on disk since"),
        "{}",
        r.stdout
    );
    let r = cli(&["explain", &stale.pid().to_string()]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("STALE since"), "{}", r.stdout);

    // No answer is never "stale": 3, whatever went wrong.
    let r = run(Some(format!("127.0.0.1:{}", free_port())), &["processes"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("is it running"), "{}", r.stderr);
    let r = cli(&["processes", "--verdict", "bogus"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("unknown verdict"), "{}", r.stderr);
    let r = cli(&["processes", "-o", "yaml"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = cli(&["explain", "4194305"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("404"), "{}", r.stderr);
    let r = run(None, &["processes", "--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Exit status"), "{}", r.stdout);

    // None of the CLI's own runs is a reader.
    let listed: Vec<Value> = everyone(&daemon);
    for pid in &cli_pids {
        assert!(
            !listed.iter().any(|p| p["pid"] == *pid),
            "the CLI ({pid}) is listed: {listed:#?}"
        );
    }
}

#[test]
fn trustdrift_itself_is_never_a_reader_and_a_process_calling_itself_trustdrift_is() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let dir = TempDir::new("cli-peers");
    // A byte-identical copy of the binary, elsewhere: a second daemon runs it, scanning
    // every trust store of the machine.
    let copy = dir.join("trustdrift-copy");
    fs::copy(trustdrift_bin(), &copy).expect("copying the binary");
    let state = dir.join("state");
    fs::create_dir_all(&state).unwrap();
    let port = free_port();
    let second = Guarded::spawn(
        Command::new(&copy)
            .args(["--log", "warn", "run", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(&state)
            .args(["--pin-dir", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http_get(port, "/readyz").0 == 200;
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never became ready");
        thread::sleep(Duration::from_millis(100));
    }
    let (_, stores) = http_get(port, "/stores");
    assert!(
        stores["stores"].as_array().is_some_and(|s| !s.is_empty()),
        "the copy read trust stores: {stores}"
    );
    // A process that only calls itself trustdrift, reading a bundle.
    let bundle = dir.join("bundle.pem");
    fs::write(&bundle, Cert::ca("Peers Root").pem).unwrap();
    let impostor = reader(dir.path(), "trustdrift", &bundle);
    let p = daemon.wait_for("listed", impostor.pid(), |p| p["verdict"] == "fresh");
    assert_eq!(p["comm"], "trustdrift");

    // Meanwhile (and after the copy's start-up scan), neither daemon lists the other.
    thread::sleep(Duration::from_secs(3));
    let own = fs::canonicalize(trustdrift_bin()).unwrap();
    for p in everyone(&daemon) {
        assert_ne!(p["pid"], second.pid(), "the copy is listed: {p:#}");
        let exe = p["exe"].as_str().unwrap_or_default();
        assert!(
            exe != own.to_str().unwrap() && exe != copy.to_str().unwrap(),
            "trustdrift is listed: {p:#}"
        );
    }
    let (_, theirs) = http_get(port, "/processes");
    assert!(
        !theirs
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["pid"] == daemon.pid())),
        "the copy lists the daemon: {theirs:#}"
    );
    // `trustdrift processes --comm trustdrift` names the impostor, and only it.
    let r = run(api(&daemon), &["processes", "--comm", "trustdrift"]);
    assert_eq!(pids(&r.stdout), vec![impostor.pid()], "{}", r.stdout);
}
