//! The kernel probe, end to end: real programs open and read trust files, and
//! `trustdrift trace` reports who did, what path they wrote, where it resolves in their
//! root, and how many bytes they read.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    os::unix::{ffi::OsStrExt, fs::symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use trustdrift_e2e::{
    Cert, Daemon, DaemonSetup, Guarded, PinDir, SOON, TempDir, Trace, Value, make_certificate,
    python3, records_for,
};

/// Runs a python script that holds on (keeping its root, cwd and fds inspectable, like a
/// long-running service) until the returned guard's stdin is closed.
fn python_held(script: &str) -> Guarded {
    let mut cmd = Command::new(python3());
    cmd.arg("-I")
        .arg("-c")
        .arg(format!("{script}\nimport sys\nsys.stdin.read()\n"))
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    Guarded::spawn(&mut cmd)
}

fn release(mut held: Guarded) {
    drop(held.0.stdin.take());
    assert!(held.wait(Duration::from_secs(10)).success());
}

fn file_len(path: &std::path::Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn is_event(v: &Value, pid: u32, path: &str, event: &str) -> bool {
    v["pid"] == pid && v["path"] == path && v["event"] == event
}

/// A python process that read a fresh certificate, as the trace saw it.
struct CertificateReader {
    /// The trace's exit record of the certificate.
    done: Value,
    cert: PathBuf,
    _dir: TempDir,
}

/// Makes a certificate named `name`, runs `script(its path)` to its end in a held python
/// process under a trace with the default paths, and returns what the trace recorded of
/// that certificate at the exit. `None` where the probe cannot load (never under CI).
fn certificate_reader(
    name: &str,
    script: impl FnOnce(&str) -> String,
) -> Option<CertificateReader> {
    let dir = TempDir::new(name);
    let (cert, _) = make_certificate(dir.path(), name);
    let trace = Trace::start(&[])?;
    let path = cert.to_str().unwrap();
    let held = python_held(&script(path));
    let pid = held.pid();
    release(held);
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    Some(CertificateReader {
        done,
        cert,
        _dir: dir,
    })
}

#[test]
fn python_default_context_reads_the_system_bundle_through_its_alias() {
    // Where this machine's OpenSSL looks by default (Debian: /usr/lib/ssl/cert.pem, a
    // symlink to /etc/ssl/certs/ca-certificates.crt).
    let out = Command::new(python3())
        .args(["-I", "-c"])
        .arg("import ssl; print(ssl.get_default_verify_paths().openssl_cafile)")
        .output()
        .unwrap();
    let cafile = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let bundle = fs::canonicalize(&cafile).expect("the default CA file exists");

    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let agent = python_held("import ssl\nctx = ssl.create_default_context()");
    let pid = agent.pid();
    let opened = trace.wait_for("of the default bundle", SOON, |v| {
        is_event(v, pid, &cafile, "open")
    });
    assert_eq!(opened["resolved"], bundle.to_str().unwrap(), "{opened}");
    assert_eq!(opened["comm"], "python3");
    release(agent);
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, &cafile, "exit"));
    assert_eq!(done["bytes_read"], file_len(&bundle), "{done}");
    assert_eq!(done["opens"], 1);
}

#[test]
fn openssl_x509_reads_the_certificate_it_is_given() {
    let dir = TempDir::new("x509");
    let (cert, _key) = make_certificate(dir.path(), "leaf");
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let mut openssl = Guarded::spawn(
        Command::new("openssl")
            .args(["x509", "-noout", "-in"])
            .arg(&cert)
            .stdout(Stdio::null()),
    );
    let pid = openssl.pid();
    assert!(openssl.wait(Duration::from_secs(10)).success());
    let path = cert.to_str().unwrap();
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    assert_eq!(done["comm"], "openssl");
    assert_eq!(done["resolved"], path);
    assert_eq!(done["bytes_read"], file_len(&cert));
    assert!(
        done["matched_by"]
            .as_array()
            .unwrap()
            .contains(&"suffix".into())
    );
}

#[test]
fn a_child_reading_under_a_custom_prefix_is_seen() {
    let dir = TempDir::new("prefix");
    let custom = dir.join("identity");
    fs::create_dir_all(&custom).unwrap();
    // No certificate suffix: only the configured prefix makes it trust material.
    let bundle = custom.join("service.bundle");
    fs::write(&bundle, vec![b'c'; 3000]).unwrap();
    let prefix = format!("{}/", custom.display());
    let Some(trace) = Trace::start(&["--prefix", &prefix]) else {
        return;
    };
    let mut cat = Guarded::spawn(Command::new("cat").arg(&bundle).stdout(Stdio::null()));
    let pid = cat.pid();
    assert!(cat.wait(Duration::from_secs(10)).success());
    let path = bundle.to_str().unwrap();
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    assert_eq!(done["bytes_read"], 3000);
    assert_eq!(done["matched_by"], serde_json::json!(["prefix"]));
}

#[test]
fn a_relative_open_through_a_dirfd_resolves_against_that_directory() {
    let dir = TempDir::new("dirfd");
    let (cert, _) = make_certificate(dir.path(), "leaf");
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let script = format!(
        "import os\n\
         d = os.open({dir:?}, os.O_RDONLY | os.O_DIRECTORY)\n\
         f = os.open('leaf.pem', os.O_RDONLY, dir_fd=d)\n\
         while os.read(f, 1000):\n    pass\n\
         os.close(f)",
        dir = dir.path().to_str().unwrap()
    );
    let held = python_held(&script);
    let pid = held.pid();
    let opened = trace.wait_for("relative open", SOON, |v| {
        is_event(v, pid, "leaf.pem", "open")
    });
    assert_eq!(opened["resolved"], cert.to_str().unwrap(), "{opened}");
    assert_ne!(opened["dirfd"], -100, "opened through a dirfd, not the cwd");
    release(held);
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, "leaf.pem", "exit"));
    assert_eq!(done["bytes_read"], file_len(&cert));
}

#[test]
fn a_hashed_name_opened_inside_a_trust_directory_is_seen_after_its_reader_exits() {
    // OpenSSL's CApath and Go's SSL_CERT_DIR: the directory is a trust path, the names in
    // it (<hash>.0) are not. The reader exits at once: the name still resolves, because
    // the probe links it to the directory fd it was opened through.
    let dir = TempDir::new("capath");
    let capath = dir.join("capath");
    fs::create_dir_all(&capath).unwrap();
    let (cert, _) = make_certificate(&capath, "root");
    let hashed = capath.join("5a8b9c0d.0");
    fs::copy(&cert, &hashed).unwrap();
    let prefix = format!("{}", capath.display());
    let Some(trace) = Trace::start(&["--prefix", &prefix]) else {
        return;
    };
    let script = format!(
        "import os\n\
         d = os.open({capath:?}, os.O_RDONLY | os.O_DIRECTORY)\n\
         os.listdir(d)\n\
         f = os.open('5a8b9c0d.0', os.O_RDONLY, dir_fd=d)\n\
         while os.read(f, 1000):\n    pass",
        capath = capath.to_str().unwrap()
    );
    let mut reader = Guarded::spawn(
        Command::new(python3())
            .args(["-I", "-c", &script])
            .stdout(Stdio::null()),
    );
    let pid = reader.pid();
    assert!(reader.wait(Duration::from_secs(10)).success());
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, "5a8b9c0d.0", "exit"));
    assert_eq!(done["resolved"], hashed.to_str().unwrap(), "{done}");
    assert!(
        done["matched_by"]
            .as_array()
            .unwrap()
            .contains(&"tracked-dirfd".into())
    );
    assert_eq!(done["bytes_read"], file_len(&hashed));
    let listed = trace.wait_for("directory", SOON, |v| {
        is_event(v, pid, capath.to_str().unwrap(), "exit")
    });
    assert!(
        listed["bytes_read"].as_u64().unwrap() > 0,
        "getdents counted: {listed}"
    );
}

#[test]
fn a_read_through_a_symlinked_alias_resolves_to_the_file_behind_it() {
    let dir = TempDir::new("alias");
    let real = dir.join("store");
    fs::create_dir_all(&real).unwrap();
    let (cert, _) = make_certificate(&real, "bundle");
    let alias = dir.join("cert.pem");
    symlink(&cert, &alias).unwrap();
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let mut cat = Guarded::spawn(Command::new("cat").arg(&alias).stdout(Stdio::null()));
    let pid = cat.pid();
    assert!(cat.wait(Duration::from_secs(10)).success());
    let path = alias.to_str().unwrap();
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    assert_eq!(done["resolved"], cert.to_str().unwrap());
    assert_eq!(done["bytes_read"], file_len(&cert));
}

#[test]
fn reads_by_one_thread_count_for_the_fd_another_thread_opened() {
    let Some(run) = certificate_reader("shared", |cert| {
        format!(
            "import os, threading\n\
             f = os.open({cert:?}, os.O_RDONLY)\n\
             def reader():\n    while os.read(f, 100):\n        pass\n\
             t = threading.Thread(target=reader)\n\
             t.start(); t.join()"
        )
    }) else {
        return;
    };
    assert_eq!(run.done["bytes_read"], file_len(&run.cert), "{}", run.done);
    assert!(run.done["reads"].as_u64().unwrap() > 1);
}

#[test]
fn opens_that_write_or_only_hold_a_path_are_not_reads() {
    // A renewal job opens the certificate to write it; a file manager holds an O_PATH
    // handle. Neither reads what a TLS stack would load: only the read-only open counts.
    let Some(run) = certificate_reader("rewritten", |cert| {
        format!(
            "import os\n\
             for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_PATH):\n    \
             os.close(os.open({cert:?}, flags))\n\
             f = os.open({cert:?}, os.O_RDONLY)\n\
             assert len(os.read(f, 50)) == 50"
        )
    }) else {
        return;
    };
    assert_eq!(run.done["opens"], 1, "{}", run.done);
    assert_eq!(run.done["bytes_read"], 50, "{}", run.done);
}

#[test]
fn reads_through_duplicated_fds_count_and_a_closed_range_stops_counting() {
    // Servers hand a trust fd around: dup2 onto a fixed number, fcntl(F_DUPFD) above a
    // floor, then close_range when they daemonise. Every read through a duplicate is the
    // file's; once the range is closed, whatever reuses the number is not.
    let Some(run) = certificate_reader("handed-around", |cert| {
        format!(
            "import ctypes, fcntl, os\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             f = os.open({cert:?}, os.O_RDONLY)\n\
             os.dup2(f, 100)\n\
             g = fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 200)\n\
             os.close(f)\n\
             assert len(os.pread(100, 10, 0)) == 10\n\
             assert len(os.pread(g, 7, 0)) == 7\n\
             assert libc.close_range(100, 101, 0) == 0, ctypes.get_errno()\n\
             z = os.open('/dev/zero', os.O_RDONLY)\n\
             assert fcntl.fcntl(z, fcntl.F_DUPFD, 100) == 100\n\
             assert len(os.read(100, 1000)) == 1000"
        )
    }) else {
        return;
    };
    assert_eq!(run.done["bytes_read"], 17, "{}", run.done);
    assert_eq!(run.done["reads"], 2, "{}", run.done);
}

#[test]
fn a_process_that_reads_the_bundle_ten_thousand_times_is_one_event() {
    let dir = TempDir::new("reread");
    let (cert, _) = make_certificate(dir.path(), "bundle");
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let script = format!(
        "for _ in range(10000):\n    with open({cert:?}, 'rb') as f:\n        f.read()",
        cert = cert.to_str().unwrap()
    );
    let mut reader = Guarded::spawn(
        Command::new(python3())
            .args(["-I", "-c", &script])
            .stdout(Stdio::null()),
    );
    let pid = reader.pid();
    assert!(reader.wait(Duration::from_secs(60)).success());
    let path = cert.to_str().unwrap();
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    assert_eq!(done["opens"], 10000, "{done}");
    assert_eq!(done["bytes_read"], 10000 * file_len(&cert));
    let records = trace.records();
    let opens = records_for(&records, pid, path)
        .into_iter()
        .filter(|v| v["event"] == "open")
        .count();
    assert_eq!(
        opens, 1,
        "aggregated in the kernel: one first-access record"
    );
    let (status, summary) = trace.stop();
    assert!(status.success());
    // A handful of events for the whole run (other processes included), not 10,000.
    assert!(summary["events"].as_u64().unwrap() < 200, "{summary}");
    assert!(
        summary["losses"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n == 0),
        "{summary}"
    );
}

#[test]
fn opens_and_reads_of_unrelated_files_produce_nothing() {
    let dir = TempDir::new("unrelated");
    let notes = dir.join("notes.txt");
    fs::write(&notes, "nothing to see").unwrap();
    let lib = dir.join("libfoo.so");
    fs::write(&lib, "not a certificate").unwrap();
    let (marker, _) = make_certificate(dir.path(), "marker");
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    // The marker is read last: once its record is here, anything the unrelated reads
    // could have produced would already be too (one ring buffer, in order).
    let script = format!(
        "for p in [{notes:?}, {lib:?}, '/etc/hostname', '/proc/self/status']:\n    \
         open(p, 'rb').read()\n\
         open({marker:?}, 'rb').read()",
        notes = notes.to_str().unwrap(),
        lib = lib.to_str().unwrap(),
        marker = marker.to_str().unwrap(),
    );
    let mut p = Guarded::spawn(
        Command::new(python3())
            .args(["-I", "-c", &script])
            .stdout(Stdio::null()),
    );
    let pid = p.pid();
    assert!(p.wait(Duration::from_secs(10)).success());
    let marker_path = marker.to_str().unwrap();
    trace.wait_for("marker", SOON, |v| is_event(v, pid, marker_path, "exit"));
    let records = trace.records();
    let seen: Vec<&str> = records
        .iter()
        .filter(|v| v["pid"] == pid)
        .filter_map(|v| v["path"].as_str())
        .collect();
    for unrelated in [
        notes.to_str().unwrap(),
        lib.to_str().unwrap(),
        "/etc/hostname",
    ] {
        assert!(
            !seen.contains(&unrelated),
            "{unrelated} is not trust material, yet it was reported: {seen:?}"
        );
    }
    assert!(!seen.iter().any(|p| p.starts_with("/proc")), "{seen:?}");
}

#[test]
fn lean_mode_sees_opens_without_following_reads() {
    let dir = TempDir::new("lean");
    let (cert, _) = make_certificate(dir.path(), "leaf");
    let Some(trace) = Trace::start(&["--mode", "lean"]) else {
        return;
    };
    let mut cat = Guarded::spawn(Command::new("cat").arg(&cert).stdout(Stdio::null()));
    let pid = cat.pid();
    assert!(cat.wait(Duration::from_secs(10)).success());
    let path = cert.to_str().unwrap();
    let done = trace.wait_for("exit", SOON, |v| is_event(v, pid, path, "exit"));
    assert_eq!(done["fd"], -1, "lean mode never sees the fd");
    assert_eq!(done["bytes_read"], 0);
    assert!(
        done["matched_by"]
            .as_array()
            .unwrap()
            .contains(&"lean".into())
    );
}

#[test]
fn an_exec_closes_the_old_image_view() {
    let dir = TempDir::new("exec");
    let (cert, _) = make_certificate(dir.path(), "leaf");
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let script = format!(
        "import os\nopen({cert:?}, 'rb').read()\nos.execv('/bin/true', ['true'])",
        cert = cert.to_str().unwrap()
    );
    let mut p = Guarded::spawn(
        Command::new(python3())
            .args(["-I", "-c", &script])
            .stdout(Stdio::null()),
    );
    let pid = p.pid();
    assert!(p.wait(Duration::from_secs(10)).success());
    let path = cert.to_str().unwrap();
    let exec = trace.wait_for("exec", SOON, |v| is_event(v, pid, path, "exec"));
    assert_eq!(exec["bytes_read"], file_len(&cert));
}

#[test]
fn ctrl_c_detaches_and_exits_zero() {
    let Some(trace) = Trace::start(&[]) else {
        return;
    };
    let (status, summary) = trace.stop();
    assert!(status.success(), "{status:?}");
    assert!(summary["losses"].is_object());
}

/// `cargo xtask bench overhead` weighs the probe against stand-ins on its own hooks:
/// empty programs (what the hooks cost by themselves) and programs that only copy the
/// path of each read-only open (the part of its work no path filter can skip). They must
/// load and attach wherever the probe does, in both modes, or the bench has nothing to
/// compare with.
#[test]
fn the_overhead_benchmarks_stand_ins_attach_on_the_probes_own_hooks() {
    if !trustdrift_e2e::is_root() {
        return trustdrift_e2e::probe_unavailable("not running as root").unwrap_or(());
    }
    let dir = TempDir::new("stand-ins");
    let unrelated = dir.join("unrelated.txt");
    fs::write(&unrelated, "nothing to see").unwrap();
    for (stand_in, mode, program) in [
        ("--floor", "full", "floor_sys_exit"),
        ("--copy-floor", "full", "copy_floor_sys_exit"),
        ("--floor", "lean", "floor_open_enter"),
        ("--copy-floor", "lean", "copy_floor_open_enter"),
    ] {
        let mut attach = Command::new(trustdrift_e2e::trustdrift_bin());
        attach
            .args([
                "--log", "warn", "attach", stand_in, "--mode", mode, "--stats",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Guarded::spawn(&mut attach);
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(30));
        if first.as_deref() != Ok("attached") {
            let _ = child.0.kill();
            let mut stderr = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return trustdrift_e2e::probe_unavailable(&format!(
                "`attach {stand_in} --mode {mode}` did not attach: {stderr}"
            ))
            .unwrap_or(());
        }
        for _ in 0..10 {
            fs::read(&unrelated).unwrap();
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.pid() as i32, libc::SIGINT) };
        let status = child.wait(Duration::from_secs(10));
        assert!(status.success(), "{stand_in} {mode}: {status:?}");
        let stats: Vec<Value> = rx
            .iter()
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        assert!(
            stats.iter().any(|s| s["program"] == program),
            "{stand_in} {mode} should have run {program}: {stats:?}"
        );
        assert!(
            !stats
                .iter()
                .any(|s| s["program"] == "sys_exit" || s["program"] == "open_enter"),
            "a stand-in runs instead of the probe, never beside it: {stats:?}"
        );
    }
}

#[test]
fn without_privileges_trace_says_what_it_needs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Already unprivileged: run it directly.
        let out = Command::new(trustdrift_e2e::trustdrift_bin())
            .arg("trace")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("CAP_BPF"));
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(trustdrift_e2e::trustdrift_bin())
        .arg("trace")
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run it as root"), "{stderr}");
    assert!(stderr.contains("CAP_BPF"), "{stderr}");
}

/// Entries of the map `name` the daemon pinned under `pins`, counted by walking its keys
/// with the bpf syscall (as `bpftool map` would): what the daemon's fill must match.
fn walked_entries(pins: &Path, name: &str, key_size: usize) -> u64 {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    let layout: PathBuf = fs::read_dir(pins)
        .expect("the pin directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"layout-"))
        })
        .expect("a pinned layout");
    let path = CString::new(layout.join("maps").join(name).as_os_str().as_bytes()).unwrap();
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the attr points at a NUL-terminated path alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get, size_of::<ObjGet>()) };
    assert!(
        fd >= 0,
        "opening pinned {name}: {}",
        std::io::Error::last_os_error()
    );
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut count = 0;
    loop {
        let attr = NextKey {
            map_fd: fd as u32,
            _pad: 0,
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: key and next_key are buffers of the map's key size, alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr,
                size_of::<NextKey>(),
            )
        };
        if rc != 0 {
            break;
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
    // SAFETY: our own fd.
    unsafe { libc::close(fd as i32) };
    count
}

/// The daemon's reported fill of `map` (`trustdrift_bpf_map_entries`).
fn reported_entries(daemon: &Daemon, map: &str) -> Option<u64> {
    let label = format!("trustdrift_bpf_map_entries{{map=\"{map}\"}} ");
    daemon
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&label)?.trim().parse().ok())
}

/// Waits until the fill the daemon reports equals a walk of the pinned tables (the fill is
/// refreshed every few seconds, and the host may be opening trust files meanwhile) and
/// the walk shows what `settled` expects, and returns it: (accesses, procs).
fn fill_matches_a_walk(
    daemon: &Daemon,
    pins: &Path,
    when: &str,
    settled: impl Fn((u64, u64)) -> bool,
) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let walked = (
            walked_entries(pins, "ACCESSES", 24),
            walked_entries(pins, "PROCS", 4),
        );
        let reported = (
            reported_entries(daemon, "accesses"),
            reported_entries(daemon, "procs"),
        );
        if settled(walked) && reported == (Some(walked.0), Some(walked.1)) {
            return walked;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: reported (accesses, procs) {reported:?}, a walk finds {walked:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A python process that opens and reads `paths`, then holds on until dropped.
fn holder(paths: &[PathBuf]) -> Guarded {
    let script = "import sys\n\
                  for p in sys.argv[1:]:\n    \
                      with open(p, 'rb') as f:\n        \
                          f.read()\n\
                  print('read', flush=True)\n\
                  sys.stdin.read()";
    let mut child = Guarded::spawn(
        Command::new(python3())
            .args(["-I", "-S", "-c", script])
            .args(paths)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the holder's answer");
    assert_eq!(line.trim(), "read");
    child
}

#[test]
fn the_reported_table_fill_matches_a_walk_after_reads_refusals_exits_and_a_restart() {
    let dir = TempDir::new("probe-fill");
    let paths: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("ca-{i}.pem"))).collect();
    let ca = Cert::ca("Fill Root");
    for p in &paths {
        fs::write(p, &ca.pem).unwrap();
    }
    let prefix = format!("{}/", dir.path().display());
    let pins = PinDir::new("fill");
    let args = [
        "--no-default-paths",
        "--prefix",
        &prefix,
        // Two paths per process: each holder's third open is refused by the probe.
        "--set",
        "probe.max_paths_per_process=2",
    ];
    let setup = || DaemonSetup {
        pin_dir: Some(pins.path()),
        ..DaemonSetup::default()
    };
    let Some(daemon) = Daemon::start_with(&args, setup()) else {
        return;
    };
    let mut holders: Vec<Guarded> = (0..3).map(|_| holder(&paths)).collect();
    for h in &holders {
        daemon.wait_for("listed with two files", h.pid(), |p| {
            p["files"].as_array().is_some_and(|f| f.len() == 2)
        });
    }
    let (accesses, procs) = fill_matches_a_walk(&daemon, pins.path(), "after the reads", |_| true);
    assert!(accesses >= 6 && procs >= 3, "({accesses}, {procs})");

    // An exit: the probe drops the process, the daemon takes its two aggregates.
    let gone = holders.remove(0);
    let pid = gone.pid();
    drop(gone);
    daemon.wait_for("exited", pid, |p| p["exited_at"].is_string());
    let after_exit = fill_matches_a_walk(&daemon, pins.path(), "after an exit", |(a, p)| {
        a <= accesses - 2 && p < procs
    });

    // A restart (with a fresh state: the new daemon knows none of the accesses): the pinned
    // probe kept counting, and the new daemon's fill still matches.
    daemon.kill();
    let Some(daemon) = Daemon::start_with(&args, setup()) else {
        panic!("the daemon did not start again");
    };
    fill_matches_a_walk(&daemon, pins.path(), "after a restart", |_| true);
    drop(holders);
    fill_matches_a_walk(&daemon, pins.path(), "after the last exits", |(_, p)| {
        p <= after_exit.1 - 2
    });
}
