//! Hostile input, end to end: broken, endless and looping trust files, processes that
//! vanish or change image mid-read, a reused pid, a probe whose buffers overflow, and
//! abusive API clients. Nothing crashes the daemon, nothing blocks it, and every
//! observation it cannot keep is counted in `/metrics`.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::fs::symlink,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, Value, replace_atomically};

/// A hostile container against the node: host files, hangs, floods, secrets, rewrites.
#[path = "hostile/node.rs"]
mod node;

/// Hostile load against the daemon's own memory: huge stores, clients that never read.
#[path = "hostile/memory.rs"]
mod memory;

/// Reads each path (at most 1 MiB of it: `/dev/zero` never ends), says so, and stays
/// until its stdin closes. `-I` and no SSL_CERT_* so nothing else is read.
fn reader(paths: &[&Path]) -> Guarded {
    let script = "import sys\n\
                  for p in sys.argv[1:]:\n    \
                      with open(p, 'rb') as f:\n        \
                          f.read(1 << 20)\n\
                  print('read', flush=True)\n\
                  sys.stdin.read()";
    let mut child = Guarded::spawn(
        Command::new("/usr/bin/python3")
            .args(["-I", "-S", "-c", script])
            .args(paths)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the reader's answer");
    assert_eq!(line.trim(), "read", "the reader could not read {paths:?}");
    child
}

fn file<'a>(p: &'a Value, path: &Path) -> &'a Value {
    let path = path.to_str().expect("a UTF-8 path");
    p["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == path))
        .unwrap_or_else(|| panic!("{path} not among the files of {p}"))
}

/// The value of the one series of `family` whose labels include `label`.
fn counter(metrics: &str, family: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn healthy(daemon: &Daemon) {
    let (status, body) = daemon.get("/healthz");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn malformed_truncated_binary_and_oversized_trust_files_are_reported_not_fatal() {
    let dir = TempDir::new("hostile-files");
    let ca = Cert::ca("Hostile Fixture Root");
    // A PEM block whose base64 is damaged in the middle.
    let corrupt = dir.join("corrupt.pem");
    let mut pem = ca.pem.clone();
    let middle = pem.len() / 2;
    pem.replace_range(middle..middle + 8, "!!!!####");
    fs::write(&corrupt, pem).unwrap();
    // A bundle cut in the middle of its second certificate.
    let truncated = dir.join("truncated.pem");
    let two = format!("{}{}", ca.pem, Cert::ca("Second Root").pem);
    fs::write(&truncated, &two[..ca.pem.len() + 200]).unwrap();
    // Binary noise named like a certificate.
    let binary = dir.join("noise.crt");
    fs::write(
        &binary,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    // Larger than the cap this daemon runs with.
    let oversized = dir.join("huge.pem");
    fs::write(&oversized, ca.pem.repeat(64 * 1024 / ca.pem.len() + 1)).unwrap();
    let Some(daemon) = Daemon::start(&["--set", "catalog.max_file_bytes=65536"]) else {
        return;
    };
    let before = daemon.metrics();

    let agent = reader(&[&corrupt, &truncated, &binary, &oversized]);
    let p = daemon.wait_for("listed with all four files", agent.pid(), |p| {
        p["files"].as_array().is_some_and(|f| f.len() == 4)
    });
    let errors = |path: &Path| -> Vec<String> {
        file(&p, path)["read_version"]["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!errors(&corrupt).is_empty(), "{p}");
    // What could be read of the truncated bundle still counts.
    assert_eq!(
        file(&p, &truncated)["read_version"]["certificates"],
        1,
        "{p}"
    );
    assert!(!errors(&truncated).is_empty(), "{p}");
    assert_eq!(file(&p, &binary)["read_version"]["certificates"], 0, "{p}");
    assert_eq!(
        file(&p, &oversized)["read_version"]["format"],
        "unreadable",
        "{p}"
    );
    assert!(errors(&oversized).iter().any(|e| e.contains("cap")), "{p}");
    let after = daemon.metrics();
    assert!(
        counter(
            &after,
            "trustdrift_scan_errors_total",
            "reason=\"too_large\""
        ) > counter(
            &before,
            "trustdrift_scan_errors_total",
            "reason=\"too_large\""
        ),
        "the oversized file is counted"
    );
    assert!(
        counter(&after, "trustdrift_parse_errors_total", "")
            > counter(&before, "trustdrift_parse_errors_total", ""),
        "the malformed files are counted"
    );
    healthy(&daemon);
}

#[test]
fn endless_files_a_fifo_and_a_link_to_dev_zero_never_block_the_daemon() {
    let dir = TempDir::new("hostile-endless");
    let zero = dir.join("zero.pem");
    symlink("/dev/zero", &zero).unwrap();
    let fifo = dir.join("fifo.pem");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let before = daemon.metrics();
    // Reads a MiB of zeroes, then opens the FIFO without waiting for a writer and reads
    // what is there (nothing), holding both.
    let script = format!(
        "import os, sys\n\
         z = open({zero:?}, 'rb'); z.read(1 << 20)\n\
         f = os.open({fifo:?}, os.O_RDONLY | os.O_NONBLOCK); os.read(f, 4096)\n\
         print('read', flush=True)\n\
         sys.stdin.read()",
        zero = zero.to_str().unwrap(),
        fifo = fifo.to_str().unwrap()
    );
    let mut holder = Guarded::spawn(
        Command::new("/usr/bin/python3")
            .args(["-I", "-S", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "read");
    let p = daemon.wait_for("listed with both", holder.pid(), |p| {
        p["files"].as_array().is_some_and(|f| f.len() == 2)
    });
    for path in [&zero, &fifo] {
        let f = file(&p, path);
        assert_eq!(f["read_version"]["format"], "unreadable", "{p}");
        assert_eq!(f["verdict"], "fresh", "nothing to judge is no alert: {p}");
    }
    let after = daemon.metrics();
    assert!(
        counter(
            &after,
            "trustdrift_scan_errors_total",
            "reason=\"not_regular\""
        ) >= counter(
            &before,
            "trustdrift_scan_errors_total",
            "reason=\"not_regular\""
        ) + 2,
        "both are counted as not regular"
    );
    healthy(&daemon);
}

#[test]
fn a_store_that_becomes_a_symlink_loop_is_reported_gone_and_the_daemon_keeps_serving() {
    let dir = TempDir::new("hostile-loop");
    let bundle = dir.join("bundle.pem");
    fs::write(&bundle, Cert::ca("Loop Root").pem).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = reader(&[&bundle]);
    daemon.wait_for("fresh", agent.pid(), |p| p["verdict"] == "fresh");
    let before = daemon.metrics();
    // bundle.pem -> loop.pem -> bundle.pem, swapped in atomically.
    symlink("bundle.pem", dir.join("loop.pem")).unwrap();
    symlink("loop.pem", dir.join("bundle.pem.new")).unwrap();
    fs::rename(dir.join("bundle.pem.new"), &bundle).unwrap();
    let p = daemon.wait_for("stale: its store is gone", agent.pid(), |p| {
        p["verdict"] == "stale"
    });
    let note = file(&p, &bundle)["note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(note.contains("no longer on disk"), "{p}");
    assert!(
        counter(
            &daemon.metrics(),
            "trustdrift_scan_errors_total",
            "reason=\"symlink_loop\""
        ) > counter(
            &before,
            "trustdrift_scan_errors_total",
            "reason=\"symlink_loop\""
        ),
        "the loop is counted"
    );
    healthy(&daemon);
}

#[test]
fn a_process_that_execs_mid_read_is_judged_on_its_new_image_only() {
    let dir = TempDir::new("hostile-exec");
    let old = dir.join("old.pem");
    let new = dir.join("new.pem");
    fs::write(&old, Cert::ca("Old Image Root").pem).unwrap();
    fs::write(&new, Cert::ca("New Image Root").pem).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    // Reads half of old.pem with the file still open, then replaces its image with a
    // reader of new.pem (the fd does not survive: O_CLOEXEC).
    let script = format!(
        "import os, sys\n\
         f = open({old:?}, 'rb'); f.read(100)\n\
         sys.stdin.readline()\n\
         os.execv('/usr/bin/python3', ['python3', '-I', '-S', '-c', \
         'import sys; open({new:?}, \"rb\").read(); print(\"read\", flush=True); sys.stdin.read()'])",
        old = old.to_str().unwrap(),
        new = new.to_str().unwrap()
    );
    let mut child = Guarded::spawn(
        Command::new("/usr/bin/python3")
            .args(["-I", "-S", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let pid = child.pid();
    daemon.wait_for("reading old.pem", pid, |p| {
        p["files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["path"] == old.to_str().unwrap()))
    });
    let mut stdin = child.0.stdin.take().unwrap();
    writeln!(stdin, "exec").unwrap();
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "read");
    let p = daemon.wait_for("only new.pem", pid, |p| {
        p["files"]
            .as_array()
            .is_some_and(|f| f.len() == 1 && f[0]["path"] == new.to_str().unwrap())
    });
    // What the old image read is gone from memory: changing it is nobody's drift.
    replace_atomically(&old, &Cert::ca("Changed Old Root").pem);
    let witness = reader(&[&old]);
    replace_atomically(&old, &Cert::ca("Changed Again Root").pem);
    daemon.wait_for("the witness stale", witness.pid(), |p| {
        p["verdict"] == "stale"
    });
    assert_eq!(daemon.process(pid).unwrap()["verdict"], "fresh", "{p}");
    drop(stdin);
}

/// Sets the pid the next fork on the host gets (`ns_last_pid` + 1); the caller spawns at
/// once and checks, since another fork can win the race.
fn next_pid_is(pid: u32) -> bool {
    fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_ok()
}

/// Spawning with a chosen pid must not race other forks of this test binary.
static FORKS: Mutex<()> = Mutex::new(());

#[test]
fn a_reused_pid_never_inherits_the_verdict_of_the_process_that_had_it() {
    let dir = TempDir::new("hostile-pid");
    let bundle = dir.join("bundle.pem");
    fs::write(&bundle, Cert::ca("Before Reuse Root").pem).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let mut first = reader(&[&bundle]);
    let pid = first.pid();
    daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");
    replace_atomically(&bundle, &Cert::ca("After Change Root").pem);
    daemon.wait_for("stale", pid, |p| p["verdict"] == "stale");
    let first_start = daemon.process(pid).unwrap()["start_time"].clone();
    let _ = first.0.kill();
    let _ = first.0.wait();

    // The same pid, a new process that read the current bundle.
    let mut second = None;
    for _ in 0..20 {
        let _forks = FORKS.lock().unwrap_or_else(|p| p.into_inner());
        assert!(next_pid_is(pid), "writing /proc/sys/kernel/ns_last_pid");
        let candidate = reader(&[&bundle]);
        if candidate.pid() == pid {
            second = Some(candidate);
            break;
        }
    }
    let second = second.expect("pid reuse could not be arranged in 20 tries");
    // `/processes/{pid}` answers with the newest process that had the pid.
    let deadline = Instant::now() + Duration::from_secs(10);
    let p = loop {
        let (status, p) = daemon.get(&format!("/processes/{pid}"));
        if status == 200 && p["start_time"] != first_start && p["verdict"] == "fresh" {
            break p;
        }
        assert!(Instant::now() < deadline, "the new holder of {pid}: {p}");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(p["exited_at"], Value::Null, "{p}");
    let listed: Vec<Value> = daemon
        .processes()
        .into_iter()
        .filter(|p| p["pid"] == pid)
        .collect();
    assert!(
        listed
            .iter()
            .any(|p| p["start_time"] == first_start && p["exited_at"].is_string()),
        "the first holder stays listed as exited: {listed:?}"
    );
    let newest = listed.iter().find(|l| l["start_time"] == p["start_time"]);
    assert!(
        newest.is_some_and(|n| n["verdict"] == "fresh"),
        "{listed:?}"
    );
    drop(second);
}

/// SIGCONTs a stopped daemon when dropped, so a failed assertion cannot leave it frozen.
struct Paused<'a>(&'a Daemon);

impl<'a> Paused<'a> {
    fn new(daemon: &'a Daemon) -> Self {
        daemon.signal(libc::SIGSTOP);
        Self(daemon)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// A python process holding every one of a set of trust files open (and read).
struct Holder {
    child: Guarded,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn wait_read(&mut self) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "read");
    }

    /// Opens and reads every file again (a new open of each), pausing `pause_ms` between.
    fn reopen(&mut self, pause_ms: u32) {
        writeln!(self.stdin, "{}", f64::from(pause_ms) / 1000.0).unwrap();
        self.wait_read();
    }
}

/// Starts `n` holders of `paths`, each pausing `pause_ms` between files; returns once all
/// have opened and read them.
fn holders(n: usize, paths: &[&Path], pause_ms: u32) -> Vec<Holder> {
    let script = "import sys, time\n\
                  def take(pause):\n    \
                      fs = []\n    \
                      for p in sys.argv[2:]:\n        \
                          fs.append(open(p, 'rb')); fs[-1].read(); time.sleep(pause)\n    \
                      return fs\n\
                  held = take(float(sys.argv[1]))\n\
                  print('read', flush=True)\n\
                  for line in sys.stdin:\n    \
                      held += take(float(line))\n    \
                      print('read', flush=True)";
    let mut started: Vec<Holder> = (0..n)
        .map(|_| {
            let mut child = Guarded::spawn(
                Command::new("/usr/bin/python3")
                    .args(["-I", "-S", "-c", script])
                    .arg((f64::from(pause_ms) / 1000.0).to_string())
                    .args(paths)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped()),
            );
            let stdin = child.0.stdin.take().unwrap();
            let stdout = BufReader::new(child.0.stdout.take().unwrap());
            Holder {
                child,
                stdin,
                stdout,
            }
        })
        .collect();
    for h in &mut started {
        h.wait_read();
    }
    started
}

#[test]
fn a_storm_that_overflows_the_ring_buffer_and_the_fd_table_is_counted_and_survived() {
    let dir = TempDir::new("hostile-storm");
    let paths: Vec<_> = (0..64).map(|i| dir.join(format!("ca-{i}.pem"))).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let pem = Cert::ca("Storm Root").pem;
    for p in &paths {
        fs::write(p, &pem).unwrap();
    }
    // The smallest ring buffer and a tiny fd table: both overflow for sure.
    let Some(daemon) = Daemon::start(&[
        "--set",
        "probe.ring_buffer_bytes=4096",
        "--set",
        "probe.max_fds=16",
    ]) else {
        return;
    };
    let lost = |m: &str, reason: &str| {
        counter(
            m,
            "trustdrift_events_lost_total",
            &format!("reason=\"{reason}\""),
        )
    };
    let wait_for_loss = |before: &str, reason: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = lost(&daemon.metrics(), reason) - lost(before, reason);
            if n > 0 {
                eprintln!("storm: {n} lost to {reason}");
                return;
            }
            assert!(Instant::now() < deadline, "no loss counted as {reason}");
            thread::sleep(Duration::from_millis(200));
        }
    };

    // The daemon stalls (as when CPU-throttled) while 512 first reads are announced: the
    // ring buffer fills; each lost announcement is counted (and re-sent on the next open).
    let before = daemon.metrics();
    let stalled = {
        let _paused = Paused::new(&daemon);
        holders(8, &refs, 0)
    };
    wait_for_loss(&before, "ringbuf_full");
    healthy(&daemon);
    // What was lost is announced again at the next open: each process, opening its files
    // again (at a pace the daemon drains), ends up listed with every one of them. A
    // re-announcement can meet a buffer still draining the others' and be lost in turn
    // (and counted): a few more opens get it through, never a silent gap.
    let mut stalled = stalled;
    let all_listed = |p: &Value| p["files"].as_array().is_some_and(|f| f.len() == 64);
    for h in &mut stalled {
        for _ in 0..3 {
            h.reopen(2);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline
                && !daemon.process(h.pid()).is_some_and(|p| all_listed(&p))
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if daemon.process(h.pid()).is_some_and(|p| all_listed(&p)) {
                break;
            }
        }
        daemon.wait_for("listed with all 64 files", h.pid(), all_listed);
    }

    // Then 4 processes each hold 16 trust files open, more than the fd table tracks: the
    // LRU evicts live handles, and each eviction is counted.
    let before = daemon.metrics();
    let holding = holders(4, &refs[..16], 5);
    wait_for_loss(&before, "fd_table_evicted");
    healthy(&daemon);
    for h in &holding {
        daemon.wait_for("listed", h.pid(), |p| {
            p["files"].as_array().is_some_and(|f| !f.is_empty())
        });
    }
}

/// Opens a connection and sends the start of a request, never its end.
fn slow_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.write_all(b"GET /processes HTTP/1.1\r\nHost: x\r\n")
        .expect("a partial request");
    s
}

/// The status of a GET, or `None` when the daemon closed the connection unanswered.
fn status_of(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[test]
fn slow_and_crowding_api_clients_are_cut_off_and_real_ones_still_get_answers() {
    let Some(daemon) = Daemon::start(&[
        "--set",
        "api.request_timeout=1s",
        "--set",
        "api.max_concurrent_requests=8",
        "--set",
        "api.max_connections=40",
    ]) else {
        return;
    };
    let port = daemon.port;
    let refused = |reason: &str| {
        counter(
            &daemon.metrics(),
            "trustdrift_api_refused_total",
            &format!("reason=\"{reason}\""),
        )
    };
    // 32 clients that never finish their request: a real one is still answered.
    let mut slow: Vec<TcpStream> = (0..32).map(|_| slow_client(port)).collect();
    assert_eq!(
        status_of(port, "/healthz"),
        Some(200),
        "answered beside 32 slow clients"
    );
    // 20 more: the connection cap (40) closes the excess on arrival.
    slow.extend((0..20).map(|_| slow_client(port)));
    // Slow clients are timed out, not waited for: each gets a 408 or a closed socket.
    thread::sleep(Duration::from_millis(2500));
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            buf.is_empty() || text.starts_with("HTTP/1.1 408"),
            "a slow client got {text:?}"
        );
    }
    drop(slow);
    assert!(
        refused("too_many_connections") >= 12,
        "the excess is counted"
    );
    assert!(
        refused("connection_timeout") >= 32,
        "the slow ones are counted"
    );
    // A crowd of concurrent clients: each is answered, told to come back (503), or, past
    // the connection cap, closed at once; and some are answered.
    let answers: Vec<Option<u16>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|_| scope.spawn(move || status_of(port, "/processes")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers.iter().all(|s| matches!(s, None | Some(200 | 503))),
        "{answers:?}"
    );
    assert!(answers.contains(&Some(200)), "{answers:?}");
    // Query strings far past the 2048-byte limit are refused, not parsed: with a 414 from
    // the API while the head fits a connection's buffer (64 KiB), and past that by the
    // parser itself (431, or the connection dropped if the client is still sending), and
    // the daemon is unmoved.
    let long = format!("/processes?comm={}", "a".repeat(32 * 1024));
    assert_eq!(status_of(port, &long), Some(414));
    let huge = format!("/processes?comm={}", "a".repeat(4 << 20));
    assert!(matches!(status_of(port, &huge), None | Some(431)));
    healthy(&daemon);
}

#[test]
fn readers_that_exit_free_their_kernel_aggregates_so_a_small_table_never_fills() {
    let dir = TempDir::new("hostile-exits");
    let paths: Vec<_> = (0..4).map(|i| dir.join(format!("ca-{i}.pem"))).collect();
    let ca = Cert::ca("Exits CA");
    for p in &paths {
        fs::write(p, &ca.pem).unwrap();
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    // Room for 16 (process, path) pairs: three rounds of 2 readers of 4 files each make 24.
    // Exited processes stay listed for the exit grace (5 min), but their final figures
    // leave the kernel at their exit, so the table never holds more than the live ones'.
    let prefix = format!("{}/", dir.path().display());
    let Some(daemon) = Daemon::start(&[
        "--no-default-paths",
        "--prefix",
        &prefix,
        "--set",
        "probe.max_accesses=16",
    ]) else {
        return;
    };
    let mut exited = Vec::new();
    for _ in 0..3 {
        let round: Vec<Guarded> = (0..2).map(|_| reader(&refs)).collect();
        let pids: Vec<u32> = round.iter().map(Guarded::pid).collect();
        for pid in &pids {
            daemon.wait_for("listed with its four files", *pid, |p| {
                p["files"].as_array().is_some_and(|f| f.len() == 4)
            });
        }
        drop(round);
        for pid in pids {
            daemon.wait_for("exited", pid, |p| p["exited_at"].is_string());
            exited.push(pid);
        }
    }
    let metrics = daemon.metrics();
    assert_eq!(
        counter(
            &metrics,
            "trustdrift_events_lost_total",
            "reason=\"access_table_full\""
        ),
        0,
        "{metrics}"
    );
    // Every exited reader keeps what it read: four files, each with its bytes.
    for pid in exited {
        let p = daemon.process(pid).expect("an exited reader stays listed");
        for path in &paths {
            let f = file(&p, path);
            assert_eq!(f["bytes_read"].as_u64(), Some(ca.pem.len() as u64), "{p}");
        }
    }
    healthy(&daemon);
}
