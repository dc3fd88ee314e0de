//! The daemon as a service: its API contract, its metrics, its configuration, reload on
//! SIGHUP, and restarts that lose nothing.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use trustdrift_e2e::{
    Cert, Daemon, DaemonSetup, PinDir, SOON, TempDir, Value, bundle, python_reader,
    python_tls_server, trustdrift_bin,
};

/// A raw request, for what a well-behaved client would never send.
fn raw(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn is_json_error(body: &Value) -> bool {
    body["error"].is_string() && body["reason"].is_string()
}

#[test]
fn the_api_serves_a_documented_schema_with_filters_and_json_errors() {
    let dir = TempDir::new("api");
    let path = dir.join("bundle.pem");
    fs::write(&path, bundle(&[&Cert::ca("API Root")])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    assert_eq!(daemon.get("/readyz").0, 200);
    assert_eq!(daemon.get("/healthz").1["status"], "ok");
    let agent = python_reader(&path);
    let pid = agent.pid();
    let p = daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");
    for key in [
        "pid",
        "start_time",
        "comm",
        "exe",
        "cmdline",
        "uid",
        "cgroup",
        "container_id",
        "pod_uid",
        "unit",
        "namespace",
        "pod",
        "container",
        "origin",
        "confidence",
        "verdict",
        "stale_since",
        "exited_at",
        "files",
    ] {
        assert!(p.get(key).is_some(), "process field {key} missing: {p}");
    }
    let f = &p["files"][0];
    for key in [
        "path",
        "resolved",
        "kind",
        "verdict",
        "stale_since",
        "first_open",
        "last_open",
        "last_read",
        "bytes_read",
        "opens",
        "reads",
        "read_version",
        "read_at",
        "current_version",
        "missing_cas",
        "removed_cas_trusted",
        "expired_in_memory",
    ] {
        assert!(f.get(key).is_some(), "file field {key} missing: {f}");
    }
    assert_eq!(f["read_version"]["sha256"], f["current_version"]["sha256"]);
    // Command lines can hold secrets: off unless asked for (api.cmdline).
    assert!(p["cmdline"].is_null(), "no command line by default: {p}");

    let listed = |query: &str| -> Vec<u64> {
        let (status, body) = daemon.get(&format!("/processes?{query}"));
        assert_eq!(status, 200, "{query}: {body}");
        body.as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect()
    };
    let pid64 = u64::from(pid);
    assert!(listed("verdict=fresh").contains(&pid64));
    assert!(!listed("verdict=stale").contains(&pid64));
    assert!(listed("comm=python3").contains(&pid64));
    assert!(!listed("comm=envoy").contains(&pid64));
    assert!(!listed("container=0123456789ab").contains(&pid64));
    assert!(!listed("namespace=payments").contains(&pid64));

    for (path, status) in [
        ("/processes?verdict=purple", 400),
        ("/processes?pid=1", 400),
        ("/processes?comm=a&comm=b", 400),
        ("/processes/not-a-pid", 400),
        ("/processes/4000000000", 404),
        ("/no/such/endpoint", 404),
        ("/stores?bogus=1", 400),
    ] {
        let (got, body) = daemon.get(path);
        assert_eq!(got, status, "{path}: {body}");
        assert!(is_json_error(&body), "{path}: {body}");
    }
    assert_eq!(daemon.get(&format!("/processes/{pid}")).1["pid"], pid);

    // No bodies, no writes, no endless query strings.
    let (status, body) = raw(
        daemon.port,
        "POST /processes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405, "{body}");
    let (status, _) = raw(
        daemon.port,
        "GET /processes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(status, 413);
    let long = format!("/processes?comm={}", "a".repeat(5000));
    assert_eq!(daemon.get(&long).0, 414);

    let (status, stores) = daemon.get("/stores");
    assert_eq!(status, 200);
    let store = stores["stores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == path.to_str().unwrap())
        .unwrap_or_else(|| panic!("{} not in /stores", path.display()));
    assert_eq!(store["root"], "host");
    assert_eq!(store["certificates"][0]["subject"], "CN=API Root");
    assert!(
        stores["host_reference"]["certificates"]
            .as_array()
            .is_some()
    );

    // With api.cmdline, command lines are shown, cut to a bounded length.
    drop(daemon);
    let Some(daemon) = Daemon::start(&["--set", "api.cmdline=true"]) else {
        return;
    };
    let agent = python_reader(&path);
    let p = daemon.wait_for("listed with its command line", agent.pid(), |p| {
        p["cmdline"].is_string()
    });
    assert!(
        p["cmdline"].as_str().unwrap().len() <= 260,
        "cmdline is truncated"
    );
}

#[test]
fn the_metrics_are_valid_prometheus_and_carry_every_family() {
    let dir = TempDir::new("metrics");
    let path = dir.join("ca.pem");
    let (kept, dropped) = (Cert::ca("Metrics Root"), Cert::ca("Dropped Root"));
    fs::write(&path, bundle(&[&kept, &dropped])).unwrap();
    let doomed = dir.join("doomed.pem");
    fs::write(&doomed, bundle(&[&kept])).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let leaf = kept.leaf("metrics.internal", Duration::from_secs(4));
    fs::write(&cert, &leaf.pem).unwrap();
    fs::write(&key, &leaf.key_pem).unwrap();
    let Some(daemon) = Daemon::start(&["--set", "metrics.bpf_stats=true"]) else {
        return;
    };
    let agent = python_reader(&path);
    let witness = python_reader(&doomed);
    let tls = python_tls_server(&cert, &key);
    for p in [&agent, &witness, &tls] {
        daemon.wait_for("fresh", p.pid(), |p| p["verdict"] == "fresh");
    }
    // A CA removed (still trusted in memory), a file gone (a scan error), a certificate
    // renewed on disk whose old version then expires in memory.
    fs::write(&path, bundle(&[&kept, &Cert::ca("Added Root")])).unwrap();
    fs::remove_file(&doomed).unwrap();
    let renewed = kept.leaf("metrics.internal", Duration::from_secs(86400));
    fs::write(&cert, &renewed.pem).unwrap();
    daemon.wait_for("stale", agent.pid(), |p| p["verdict"] == "stale");
    daemon.wait_for("expired", tls.pid(), |p| {
        p["verdict"] == "expired_in_memory"
    });
    // The engine publishes its own health every 5 s; wait for a scrape that has it all.
    let deadline = Instant::now() + SOON;
    let mut text = daemon.metrics();
    while !(text.contains("trustdrift_bpf_map_entries{") && text.contains("not_found"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        text = daemon.metrics();
    }

    // A real Prometheus parser accepts it.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool rejects the exposition: {report}\n{text}"
    );

    let series = |name: &str| -> Vec<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .collect()
    };
    let stale = series("trustdrift_stale_processes");
    let ours = stale
        .iter()
        .find(|l| l.contains("comm=\"python3\"") && l.contains("kind=\"ca\""))
        .unwrap_or_else(|| panic!("no stale series for the agent:\n{text}"));
    for label in [
        "confidence=\"observed\"",
        "namespace=\"\"",
        "pod=\"\"",
        "container=\"\"",
    ] {
        assert!(ours.contains(label), "{label} in {ours}");
    }
    for forbidden in ["pid=", "cmdline=", "exe="] {
        assert!(
            !text.contains(forbidden),
            "unbounded label {forbidden} exported"
        );
    }
    for family in [
        "trustdrift_stale_processes",
        "trustdrift_stale_since_timestamp_seconds",
        "trustdrift_expired_in_memory_processes",
        "trustdrift_removed_ca_trusted_processes",
        "trustdrift_store_certificates",
        "trustdrift_store_last_change_timestamp_seconds",
        "trustdrift_store_info",
        "trustdrift_events_total",
        "trustdrift_events_lost_total",
        "trustdrift_probe_attached",
        "trustdrift_bpf_program_run_time_seconds_total",
        "trustdrift_bpf_program_runs_total",
        "trustdrift_bpf_map_entries",
        "trustdrift_bpf_map_capacity",
        "trustdrift_scan_errors_total",
        "trustdrift_build_info",
        "trustdrift_processes",
    ] {
        assert!(!series(family).is_empty(), "no {family} series:\n{text}");
    }
    assert!(
        series("trustdrift_expired_in_memory_processes")
            .iter()
            .any(|l| l.contains("kind=\"identity\"")),
        "{text}"
    );
    assert!(
        series("trustdrift_scan_errors_total")
            .iter()
            .any(|l| l.contains("reason=\"not_found\"")),
        "{text}"
    );
    let store = series("trustdrift_store_certificates")
        .into_iter()
        .find(|l| l.contains(path.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no store series for the bundle:\n{text}"));
    assert!(store.ends_with(" 2"), "{store}");
    assert!(series("trustdrift_probe_attached")[0].ends_with(" 1"));
    assert!(
        series("trustdrift_bpf_program_runs_total")
            .iter()
            .any(|l| l.contains("program=\"sys_exit\"") && !l.ends_with(" 0")),
        "kernel accounting is on: {text}"
    );
    for reason in [
        "ringbuf_full",
        "access_table_full",
        "fd_table_evicted",
        "path_truncated",
    ] {
        assert!(
            series("trustdrift_events_lost_total")
                .iter()
                .any(|l| l.contains(&format!("reason=\"{reason}\""))),
            "loss reason {reason} exported"
        );
    }
    // Prometheus itself asks for OpenMetrics, and gets it.
    let (_, om) = {
        let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
        s.write_all(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (0, out)
    };
    assert!(om.contains("application/openmetrics-text") && om.trim_end().ends_with("# EOF"));
}

#[test]
fn an_invalid_configuration_is_a_clear_error_naming_key_and_value() {
    let dir = TempDir::new("config");
    let cases = [
        (
            "[catalog]\nmax_file_bytes = \"big\"\n",
            "catalog.max_file_bytes",
            "big",
        ),
        (
            "[api]\nlisten = \"everywhere\"\n",
            "api.listen",
            "everywhere",
        ),
        ("[probe]\nmod = \"lean\"\n", "probe.mod", ""),
        ("[paths]\nsuffixes = [\"\"]\n", "paths.suffixes", ""),
    ];
    for (i, (text, key, value)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("bad-{i}.toml"));
        fs::write(&file, text).unwrap();
        let out = Command::new(trustdrift_bin())
            .args(["--config", file.to_str().unwrap(), "run"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(key) && err.contains(value), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = Command::new(trustdrift_bin())
        .arg("config")
        .env("TRUSTDRIFT_LEDGER_EXIT_GRACE", "forever")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("TRUSTDRIFT_LEDGER_EXIT_GRACE") && err.contains("forever"),
        "{err}"
    );
    // The effective configuration, merged in the documented order.
    let file = dir.join("good.toml");
    fs::write(
        &file,
        "[api]\nlisten = \"127.0.0.1:1111\"\n[catalog]\nmax_file_bytes = 5\n",
    )
    .unwrap();
    let out = Command::new(trustdrift_bin())
        .args([
            "--config",
            file.to_str().unwrap(),
            "config",
            "--set",
            "catalog.max_file_bytes=7",
        ])
        .env("TRUSTDRIFT_API_LISTEN", "127.0.0.1:2222")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("listen = \"127.0.0.1:2222\""),
        "env over file: {text}"
    );
    assert!(
        text.contains("max_file_bytes = 7"),
        "flag over file: {text}"
    );
}

#[test]
fn sighup_reloads_the_trust_paths_into_the_kernel_without_dropping_observations() {
    let dir = TempDir::new("reload");
    let custom = dir.join("identity");
    fs::create_dir_all(&custom).unwrap();
    // No certificate suffix: trust material only once its folder is configured.
    let material = custom.join("service.bundle");
    fs::write(&material, bundle(&[&Cert::ca("Reload Root")])).unwrap();
    let known = dir.join("known.pem");
    fs::write(&known, bundle(&[&Cert::ca("Known Root")])).unwrap();
    let config = dir.join("trustdrift.toml");
    fs::write(&config, "[log]\nlevel = \"info\"\n").unwrap();
    let Some(daemon) = Daemon::start(&["--config", config.to_str().unwrap()]) else {
        return;
    };
    let before = python_reader(&known);
    daemon.wait_for("listed", before.pid(), |p| p["verdict"] == "fresh");
    let unseen = python_reader(&material);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        daemon.process(unseen.pid()).is_none(),
        "not trust material yet"
    );

    fs::write(
        &config,
        format!(
            "[log]\nlevel = \"info\"\n[paths]\nprefixes = [\"{}/\"]\n",
            custom.display()
        ),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + SOON;
    while !daemon.log().contains("trust paths reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = python_reader(&material);
    let p = daemon.wait_for("listed", after.pid(), |p| p["verdict"] == "fresh");
    assert!(
        p["files"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("service.bundle")
    );
    // What was observed before the reload is still there.
    assert!(daemon.process(before.pid()).is_some());
    // A broken configuration on SIGHUP keeps the running one.
    fs::write(&config, "[paths]\nprefixes = [\"relative/\"]\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let deadline = Instant::now() + SOON;
    while !daemon.log().contains("keeping the running configuration") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.log().contains("paths.prefixes"));
    assert_eq!(daemon.get("/healthz").0, 200);
}

/// A bpffs directory of the test's own, removed (which detaches what is pinned there)
/// even when the test fails.
#[test]
fn a_restart_loses_nothing_a_process_read_before_or_during_it() {
    let dir = TempDir::new("restart");
    let state = dir.join("state");
    let pins = PinDir::new("restart");
    let setup = || DaemonSetup {
        state_dir: Some(&state),
        pin_dir: Some(pins.path()),
        ..DaemonSetup::default()
    };
    let path = dir.join("bundle.pem");
    let first_ca = Cert::ca("Before Restart");
    fs::write(&path, bundle(&[&first_ca])).unwrap();
    let Some(daemon) = Daemon::start_with(&[], setup()) else {
        return;
    };
    let agent = python_reader(&path);
    let pid = agent.pid();
    let seen = daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");
    let read_at = seen["files"][0]["read_at"].clone();
    // Wait until a save made after the daemon listed it is on disk, then crash.
    let listed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = Instant::now() + SOON;
    loop {
        let saved = daemon
            .metrics()
            .lines()
            .find(|l| l.starts_with("trustdrift_state_last_save_timestamp_seconds "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if saved > listed_at {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger was never saved (last save {saved}, listed {listed_at}):\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.kill();

    // While the daemon is down, another process reads the bundle: the pinned probe
    // records it.
    let during = python_reader(&path);
    let restarted = Daemon::start_with(&[], setup()).expect("the daemon restarts");
    let p = restarted.wait_for("restored", pid, |p| p["verdict"] == "fresh");
    assert_eq!(
        p["files"][0]["read_at"], read_at,
        "the original read time is kept"
    );
    restarted.wait_for("recorded while down", during.pid(), |p| {
        p["verdict"] == "fresh"
    });

    // The store changes after the restart: the agent is stale, since its original read.
    fs::write(&path, bundle(&[&first_ca, &Cert::ca("After Restart")])).unwrap();
    let p = restarted.wait_for("stale", pid, |p| p["verdict"] == "stale");
    assert_eq!(p["files"][0]["read_at"], read_at);
    assert_eq!(
        p["files"][0]["missing_cas"][0]["subject"],
        "CN=After Restart"
    );
    assert!(
        restarted.log().contains("took over the pinned probe"),
        "{}",
        restarted.log()
    );
}

#[test]
fn the_cli_lists_and_explains_from_the_running_daemon() {
    let dir = TempDir::new("cli");
    let path = dir.join("bundle.pem");
    let ca = Cert::ca("CLI Root");
    fs::write(&path, bundle(&[&ca])).unwrap();
    let socket = dir.join("api.sock");
    let setup = DaemonSetup {
        also_listen: Some(format!("unix:{}", socket.display())),
        ..DaemonSetup::default()
    };
    let Some(daemon) = Daemon::start_with(&[], setup) else {
        return;
    };
    let agent = python_reader(&path);
    daemon.wait_for("fresh", agent.pid(), |p| p["verdict"] == "fresh");
    fs::write(&path, bundle(&[&ca, &Cert::ca("Newer Root")])).unwrap();
    daemon.wait_for("stale", agent.pid(), |p| p["verdict"] == "stale");
    let api = format!("unix:{}", socket.display());
    let run = |args: &[&str]| {
        let out = Command::new(trustdrift_bin()).args(args).output().unwrap();
        // 0, 1 (stale) or 2 (expired in memory): an answer (README's exit statuses; other
        // processes on the machine may be listed too).
        assert!(
            matches!(out.status.code(), Some(0..=2)),
            "{args:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = run(&["processes", "--api", &api]);
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&agent.pid().to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("stale") && row.contains("1/1 drifted"),
        "{row}"
    );
    let json: Value = serde_json::from_str(&run(&["processes", "--api", &api, "--json"])).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == agent.pid())
    );
    let words = run(&["explain", &agent.pid().to_string(), "--api", &api]);
    assert!(words.contains("Verdict: STALE since"), "{words}");
    assert!(words.contains("CN=Newer Root"), "{words}");
    assert!(words.contains("What to do"), "{words}");
    let out = Command::new(trustdrift_bin())
        .args(["explain", "4000000000", "--api", &api])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "no answer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 404"));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let Some(daemon) = Daemon::start(&["--log-format", "json"]) else {
        return;
    };
    let log = daemon.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

/// The nice value of each thread of `pid`, by thread name.
fn thread_nice(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let name = fs::read_to_string(task.join("comm")).unwrap_or_default();
        let stat = fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state is field 3, nice field 19.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if let Some(nice) = rest.split_whitespace().nth(16) {
            out.push((name.trim().to_owned(), nice.parse().unwrap()));
        }
    }
    out
}

#[test]
fn the_daemon_raises_its_priority_so_a_storm_cannot_starve_it_unless_told_not_to() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let threads = thread_nice(daemon.pid());
    assert!(
        threads.iter().any(|(name, _)| name == "td-intake"),
        "the ring-buffer intake thread runs: {threads:?}"
    );
    assert!(
        threads.iter().all(|(_, nice)| *nice == -5),
        "every thread at the default boost (nice -5): {threads:?}"
    );
    drop(daemon);
    let Some(daemon) = Daemon::start(&["--set", "probe.priority_boost=0"]) else {
        return;
    };
    let threads = thread_nice(daemon.pid());
    assert!(
        threads.iter().all(|(_, nice)| *nice == 0),
        "no boost when told: {threads:?}"
    );
}

/// Capability bits of a `CapXxx:` line of a thread's status.
fn caps_of(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn once_attached_every_thread_keeps_only_what_reading_other_processes_files_needs() {
    let dir = TempDir::new("caps");
    let path = dir.join("bundle.pem");
    fs::write(&path, bundle(&[&Cert::ca("Caps Root")])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    // CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19); CAP_BPF (39) only on kernels before
    // 6.5, where every bpf() call needs it.
    let kept: u64 = (1 << 2) | (1 << 19);
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.trim().split(|c: char| !c.is_ascii_digit());
    let version: (u32, u32) = (
        v.next().unwrap().parse().unwrap(),
        v.next().unwrap().parse().unwrap(),
    );
    let allowed = if version < (6, 5) {
        kept | (1 << 39)
    } else {
        kept
    };
    let tasks = fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap();
    let mut seen = 0;
    for task in tasks.flatten() {
        let status = fs::read_to_string(task.path().join("status")).unwrap();
        let name = status.lines().next().unwrap_or_default().to_owned();
        for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(caps_of(&status, field), allowed, "{name} {field}\n{status}");
        }
        assert_eq!(caps_of(&status, "CapInh:"), 0, "{name}");
        assert_eq!(caps_of(&status, "CapAmb:"), 0, "{name}");
        assert!(status.contains("NoNewPrivs:\t1"), "{name}: {status}");
        seen += 1;
    }
    assert!(seen >= 3, "the engine, the API and the intake threads");
    assert!(daemon.log().contains("dropped every other capability"));
    // And it still does its work: reads in other processes' roots, map reads, a reload.
    let reader = python_reader(&path);
    daemon.wait_for("fresh", reader.pid(), |p| p["verdict"] == "fresh");
    daemon.signal(libc::SIGHUP);
    fs::write(&path, bundle(&[&Cert::ca("Caps Root 2")])).unwrap();
    daemon.wait_for("stale", reader.pid(), |p| p["verdict"] == "stale");
    assert_eq!(daemon.get("/healthz").0, 200);
}

#[test]
fn the_state_directory_is_private_and_links_planted_in_it_or_in_the_pins_are_never_followed() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let dir = TempDir::new("private-state");
    // Left by an older version: world-readable, with links planted where the daemon
    // writes and where its clean-up walks.
    let state = dir.join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(state.join("ledger.json"), "{\"format\": 2}").unwrap();
    fs::set_permissions(state.join("ledger.json"), fs::Permissions::from_mode(0o644)).unwrap();
    let victim = dir.join("victim");
    fs::write(&victim, "not the daemon's").unwrap();
    symlink(&victim, state.join("ledger.json.tmp")).unwrap();
    let pins = PinDir::new("private");
    let outside = PinDir::new("outside");
    fs::create_dir_all(outside.path().join("keep")).unwrap();
    let setup = || DaemonSetup {
        state_dir: Some(&state),
        pin_dir: Some(pins.path()),
        ..DaemonSetup::default()
    };
    let Some(daemon) = Daemon::start_with(&["--set", "state.unpin_on_exit=true"], setup()) else {
        return;
    };
    let path = dir.join("bundle.pem");
    fs::write(&path, bundle(&[&Cert::ca("Private State Root")])).unwrap();
    let reader = python_reader(&path);
    daemon.wait_for("fresh", reader.pid(), |p| p["verdict"] == "fresh");
    // A link in the pin directory to a directory elsewhere in bpffs.
    symlink(outside.path().join("keep"), pins.path().join("planted")).unwrap();
    daemon.stop().expect("a clean stop saves");

    let mode = |p: &std::path::Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "the state directory");
    for name in ["ledger.json", "journal"] {
        assert_eq!(mode(&state.join(name)), 0o600, "{name}");
    }
    assert!(
        fs::read_to_string(state.join("ledger.json"))
            .unwrap()
            .contains("Private State Root"),
        "the ledger was saved in place"
    );
    assert_eq!(
        fs::read_to_string(&victim).unwrap(),
        "not the daemon's",
        "the planted link was not written through"
    );
    assert!(
        outside.path().join("keep").is_dir(),
        "the pin clean-up did not follow the planted link"
    );
}

/// Metric family names in the first column of docs/metrics.md's tables (a cell may name
/// several, comma-separated).
fn documented_metrics() -> std::collections::BTreeSet<String> {
    let docs = fs::read_to_string(trustdrift_e2e::repo().join("docs/metrics.md")).unwrap();
    docs.lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_metric_the_daemon_exports_is_documented_and_every_documented_one_is_exported() {
    // Every opt-in family switched on, so that all of them are there.
    let Some(daemon) = Daemon::start(&[
        "--set",
        "metrics.per_process=true",
        "--set",
        "metrics.bpf_stats=true",
    ]) else {
        return;
    };
    // A family with nothing to count has no series: give every group gauge something. A
    // process holds a CA that leaves the file, a leaf and an expired root both renewed on
    // disk.
    let dir = TempDir::new("metrics-documented");
    let path = dir.join("bundle.pem");
    let issuer = Cert::ca("Documented Issuer");
    let leaving = Cert::ca("Documented Leaving Root");
    let expired = Cert::expired_ca("Documented Renewed Root", Duration::from_secs(86_400));
    let leaf = issuer.leaf("documented.test", Duration::from_secs(2 * 86_400));
    fs::write(&path, bundle(&[&issuer, &leaving, &expired, &leaf])).unwrap();
    let reader = python_reader(&path);
    daemon.wait_for("fresh", reader.pid(), |p| p["verdict"] == "fresh");
    let renewed_leaf = issuer.leaf("documented.test", Duration::from_secs(90 * 86_400));
    let renewed_root = Cert::ca("Documented Renewed Root");
    fs::write(&path, bundle(&[&issuer, &renewed_root, &renewed_leaf])).unwrap();
    daemon.wait_for("expired in memory", reader.pid(), |p| {
        p["verdict"] == "expired_in_memory"
    });
    let deadline = Instant::now() + SOON;
    let mut text = daemon.metrics();
    while !text.contains("trustdrift_stale_certificate_expiration_timestamp_seconds{")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
        text = daemon.metrics();
    }
    // Declared families, whether or not they have series now.
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.to_owned())
        .collect();
    let documented = documented_metrics();
    let base = |name: &str| name.strip_suffix("_total").unwrap_or(name).to_owned();
    let documented_bases: std::collections::BTreeSet<String> =
        documented.iter().map(|n| base(n)).collect();
    let exported_bases: std::collections::BTreeSet<String> =
        exported.iter().map(|n| base(n)).collect();
    let undocumented: Vec<_> = exported_bases.difference(&documented_bases).collect();
    assert!(
        undocumented.is_empty(),
        "exported, not in docs/metrics.md: {undocumented:?}"
    );
    let missing: Vec<_> = documented_bases.difference(&exported_bases).collect();
    assert!(
        missing.is_empty(),
        "in docs/metrics.md, not exported: {missing:?}\n{text}"
    );
}
