//! A hostile container against the root daemon: it must not be able to make the daemon
//! read a host file, hang, go blind, fingerprint a secret, or judge a process by a file it
//! did not open. Real mount namespaces, cgroups, FIFOs, a FUSE server that never answers,
//! unprivileged floods and a process rewriting its own memory during its opens.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{
    Cert, Daemon, DaemonSetup, Guarded, TempDir, Value, python_reader, random_hex,
    replace_atomically, sha256_hex,
};

use super::{counter, healthy};

const SA_NAMESPACE: &str = "var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// A cgroup (v2) of its own, as a container has; its processes are killed and it is
/// removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    /// `name` under the cgroup2 hierarchy (the unified one on a hybrid host).
    fn new(name: &str) -> Self {
        const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
        let is_v2 = |p: &Path| rustix_statfs(p).is_some_and(|t| t == CGROUP2_SUPER_MAGIC);
        let base = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| is_v2(p))
            .expect("a cgroup2 hierarchy");
        let dir = base.join(name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    /// A docker-style container scope: `docker-<64 hex>.scope`.
    fn docker() -> Self {
        Self::new(&format!("docker-{}.scope", random_hex(32)))
    }

    fn add(&self, pid: u32) {
        fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("joining the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let procs = fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: the processes the test put here.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn rustix_statfs(p: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(p.to_str()?).ok()?;
    // SAFETY: a valid path and an out-struct of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type)
}

/// A container root: a directory with a CA bundle where Debian keeps it.
fn container_root(name: &str, ca: &Cert) -> TempDir {
    let root = TempDir::new(name);
    fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), &ca.pem).unwrap();
    fs::create_dir_all(root.join(SA_NAMESPACE).parent().unwrap()).unwrap();
    root
}

/// A process in a mount namespace of its own, in `cgroup`, chrooted into `root`: it reads
/// `reads` (paths inside its root) and stays, holding the last one open.
fn contained(root: &Path, cgroup: &Cgroup, reads: &[&str]) -> Guarded {
    let script = "import os, sys\n\
                  sys.stdin.readline()\n\
                  os.chroot(sys.argv[1])\n\
                  os.chdir('/')\n\
                  held = []\n\
                  for p in sys.argv[2:]:\n    \
                      fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)\n    \
                      os.read(fd, 1 << 20)\n    \
                      held.append(fd)\n\
                  print('read', flush=True)\n\
                  sys.stdin.read()";
    let mut child = Guarded::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "/usr/bin/python3"])
            .args(["-I", "-S", "-c", script])
            .arg(root)
            .args(reads)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    // Into its cgroup before it does anything, as a runtime does.
    cgroup.add(child.pid());
    writeln!(child.0.stdin.as_mut().unwrap(), "go").unwrap();
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "read", "the contained process read its files");
    child
}

/// A file planted on the host for the length of a test, with the directories it needed;
/// what was there before is left alone.
struct Planted {
    created: Vec<PathBuf>,
}

impl Planted {
    fn at(path: &Path, content: &str) -> Self {
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            dir = d.parent();
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).unwrap();
            created.push(d);
        }
        if !path.exists() {
            fs::write(path, content).unwrap();
            created.push(path.to_path_buf());
        }
        Self { created }
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        for p in self.created.iter().rev() {
            let _ = fs::remove_file(p).or_else(|_| fs::remove_dir(p));
        }
    }
}

/// A FUSE filesystem served by `tests/fixtures/hung_fuse.py`, one of whose operations
/// never answers. Dropping it kills the server first (which aborts what is stuck on it)
/// and then detaches the mount, even when the test failed half-way.
struct HungFuse {
    server: Option<Guarded>,
    mountpoint: PathBuf,
}

impl HungFuse {
    fn mount(at: &Path, file: &str, hang: &str) -> Self {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hung_fuse.py");
        let mut server = Guarded::spawn(
            Command::new("/usr/bin/python3")
                .arg(&fixture)
                .arg(at)
                .args(["--file", file, "--hang", hang])
                .stdout(Stdio::piped()),
        );
        let mut line = String::new();
        BufReader::new(server.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the FUSE server is serving");
        Self {
            server: Some(server),
            mountpoint: at.to_path_buf(),
        }
    }
}

impl Drop for HungFuse {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

#[test]
fn a_container_cannot_make_the_daemon_read_a_host_file_as_its_namespace() {
    let ca = Cert::ca("Container CA");
    let host_only = TempDir::new("host-only");
    fs::write(host_only.join("namespace"), "stolen-from-host").unwrap();
    // Where a DaemonSet's own service account sits on the daemon's side.
    let _host_sa = Planted::at(
        Path::new("/run/secrets/kubernetes.io/serviceaccount/namespace"),
        "stolen-from-host-run",
    );
    // The namespace file is a link to a path that exists only on the host.
    let linked = container_root("ct-link", &ca);
    symlink(host_only.join("namespace"), linked.join(SA_NAMESPACE)).unwrap();
    // /var/run is the usual absolute link to /run, and the container has no /run/secrets:
    // followed on the daemon's side, that is the daemon's (the host's) own.
    let var_run = container_root("ct-varrun", &ca);
    fs::remove_dir_all(var_run.join("var/run")).unwrap();
    symlink("/run", var_run.join("var/run")).unwrap();
    // An honest pod, and one whose namespace is no Kubernetes name.
    let honest = container_root("ct-honest", &ca);
    fs::write(honest.join(SA_NAMESPACE), "payments\n").unwrap();
    let bogus = container_root("ct-bogus", &ca);
    fs::write(bogus.join(SA_NAMESPACE), "Payments; rm -rf /\n").unwrap();

    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let cgroups: Vec<Cgroup> = (0..4).map(|_| Cgroup::docker()).collect();
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let procs: Vec<Guarded> = [&linked, &var_run, &honest, &bogus]
        .iter()
        .zip(&cgroups)
        .map(|(root, cg)| contained(root.path(), cg, &[bundle]))
        .collect();
    let namespace_of = |p: &Guarded| {
        let seen = daemon.wait_for("attributed to its container", p.pid(), |v| {
            v["container_id"].is_string() && v["files"].as_array().is_some_and(|f| !f.is_empty())
        });
        seen["namespace"].clone()
    };
    assert_eq!(
        namespace_of(&procs[0]),
        Value::Null,
        "a link out of the root"
    );
    assert_eq!(namespace_of(&procs[1]), Value::Null, "/var/run -> /run");
    assert_eq!(
        namespace_of(&procs[2]),
        "payments",
        "an honest pod is named"
    );
    assert_eq!(namespace_of(&procs[3]), Value::Null, "not a DNS-1123 label");
    let (_, body) = daemon.get("/processes");
    assert!(
        !body.to_string().contains("stolen-from-host"),
        "a host file's content reached the API: {body}"
    );
    healthy(&daemon);
    drop(procs);
}

#[test]
fn a_fifo_or_a_never_answering_fuse_file_stalls_neither_the_api_nor_other_verdicts() {
    let ca = Cert::ca("Stall CA");
    // A container whose service-account namespace is a FIFO nobody writes.
    let root = container_root("ct-fifo", &ca);
    let fifo = std::ffi::CString::new(root.join(SA_NAMESPACE).to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // A FUSE file whose reads never return (as a wedged FUSE or NFS mount), under a
    // trust suffix.
    let mnt = TempDir::new("fuse");
    let fuse = HungFuse::mount(mnt.path(), "ca.pem", "read");
    // And an honest service whose bundle is about to change.
    let honest_dir = TempDir::new("stall-honest");
    let bundle = honest_dir.join("bundle.pem");
    fs::write(&bundle, &ca.pem).unwrap();

    let Some(daemon) = Daemon::start(&["--set", "catalog.io_timeout=1s"]) else {
        return;
    };
    let cgroup = Cgroup::docker();
    let container = contained(
        root.path(),
        &cgroup,
        &["/etc/ssl/certs/ca-certificates.crt"],
    );
    // Opens the FUSE file (the open is answered) and then hangs reading it (killable).
    let fused = mnt.join("ca.pem");
    let script = format!(
        "import os\nfd = os.open({:?}, os.O_RDONLY)\nprint('read', flush=True)\nos.read(fd, 64)",
        fused.to_str().unwrap()
    );
    let mut fuse_reader = Guarded::spawn(
        Command::new("/usr/bin/python3")
            .args(["-I", "-S", "-c", &script])
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(fuse_reader.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "read");
    let honest = python_reader(&bundle);
    // While the daemon's reads of the FIFO and the FUSE file are stuck, the API answers.
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let asked = Instant::now();
        let (status, body) = daemon.get("/readyz");
        assert_eq!(status, 200, "{body}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "the API took {:?} to answer",
            asked.elapsed()
        );
        thread::sleep(Duration::from_millis(200));
    }
    daemon.wait_for("listed, nameless", container.pid(), |p| {
        p["container_id"].is_string() && p["namespace"].is_null()
    });
    daemon.wait_for("listed with the FUSE file", fuse_reader.pid(), |p| {
        p["files"].as_array().is_some_and(|f| !f.is_empty())
    });
    // Other processes are still judged.
    daemon.wait_for("fresh", honest.pid(), |p| p["verdict"] == "fresh");
    replace_atomically(&bundle, &Cert::ca("Stall CA, renewed").pem);
    daemon.wait_for("stale after its bundle changed", honest.pid(), |p| {
        p["verdict"] == "stale"
    });
    let metrics = daemon.metrics();
    assert!(
        counter(
            &metrics,
            "trustdrift_scan_errors_total",
            "reason=\"timeout\""
        ) >= 1,
        "the read that timed out is counted: {metrics}"
    );
    healthy(&daemon);
    // The server's death aborts the stuck read; then a restart with the FIFO container
    // still running must not hang in its start-up scan.
    drop(fuse_reader);
    drop(fuse);
    drop(daemon);
    let started = Instant::now();
    let Some(daemon) = Daemon::start(&["--set", "catalog.io_timeout=1s"]) else {
        return;
    };
    assert!(started.elapsed() < Duration::from_secs(20));
    daemon.wait_for("seeded, nameless", container.pid(), |p| {
        p["container_id"].is_string() && p["namespace"].is_null()
    });
    healthy(&daemon);
}

#[test]
fn a_flood_of_paths_from_one_uid_cannot_blind_the_node() {
    // 10,000 distinct trust paths, world-readable.
    let flood_dir = TempDir::new("flood");
    fs::set_permissions(flood_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for i in 0..10_000 {
        fs::write(flood_dir.join(format!("f{i}.pem")), "").unwrap();
    }
    let victim_dir = TempDir::new("flood-victim");
    fs::set_permissions(victim_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bundle = victim_dir.join("bundle.pem");
    fs::write(&bundle, Cert::ca("Victim CA").pem).unwrap();
    fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644)).unwrap();

    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    // `nobody`, in a cgroup of its own (a container), from long-lived processes: five
    // open 10,000 paths each, then forty more open 300 each.
    let cgroup = Cgroup::new(&format!("trustdrift-e2e-flood-{}", random_hex(4)));
    let flooder = |count: usize| {
        let script = format!(
            "import os, sys\n\
             sys.stdin.readline()\n\
             os.setgroups([]); os.setgid(65534); os.setuid(65534)\n\
             for i in range({count}):\n    \
                 os.close(os.open('{}/f%d.pem' % i, os.O_RDONLY))\n\
             print('read', flush=True)\n\
             sys.stdin.read()",
            flood_dir.path().display()
        );
        let mut child = Guarded::spawn(
            Command::new("/usr/bin/python3")
                .args(["-I", "-S", "-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        cgroup.add(child.pid());
        writeln!(child.0.stdin.as_mut().unwrap(), "go").unwrap();
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "read");
        child
    };
    let mut flood: Vec<Guarded> = (0..5).map(|_| flooder(10_000)).collect();
    flood.extend((0..40).map(|_| flooder(300)));
    // A service of another uid, in another mount namespace, reads its bundle.
    let script = format!(
        "import os, sys\n\
         os.setgroups([]); os.setgid(4242); os.setuid(4242)\n\
         open({:?}, 'rb').read()\n\
         print('read', flush=True)\n\
         sys.stdin.read()",
        bundle.to_str().unwrap()
    );
    let mut victim = Guarded::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "/usr/bin/python3"])
            .args(["-I", "-S", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(victim.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "read");
    daemon.wait_for("observed despite the flood", victim.pid(), |p| {
        p["verdict"] == "fresh" && p["files"].as_array().is_some_and(|f| f.len() == 1)
    });
    replace_atomically(&bundle, &Cert::ca("Victim CA, renewed").pem);
    daemon.wait_for("stale within the usual latency", victim.pid(), |p| {
        p["verdict"] == "stale"
    });
    let metrics = daemon.metrics();
    let lost = |reason: &str| {
        counter(
            &metrics,
            "trustdrift_events_lost_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert!(lost("process_quota") > 0, "{metrics}");
    assert!(lost("owner_quota") > 0, "{metrics}");
    assert_eq!(lost("access_table_full"), 0, "{metrics}");
    healthy(&daemon);
    drop(flood);
}

#[test]
fn a_password_or_a_key_read_under_a_trust_path_is_never_fingerprinted() {
    let secrets_root = Path::new("/run/secrets");
    let dir = secrets_root.join(format!("trustdrift-e2e-{}", random_hex(6)));
    let _planted = Planted::at(&dir.join(".keep"), "");
    let password = dir.join("db_password");
    let key = dir.join("tls.key");
    let ca_path = dir.join("ca.crt");
    let secret = format!("hunter2-{}\n", random_hex(3));
    let ca = Cert::ca("Public CA");
    fs::write(&password, &secret).unwrap();
    fs::write(&key, &ca.key_pem).unwrap();
    fs::write(&ca_path, &ca.pem).unwrap();
    let state = TempDir::new("secrets-state");
    let Some(daemon) = Daemon::start_with(
        &[],
        DaemonSetup {
            state_dir: Some(state.path()),
            ..DaemonSetup::default()
        },
    ) else {
        let _ = fs::remove_dir_all(&dir);
        return;
    };
    let script = format!(
        "import sys\n\
         for p in [{:?}, {:?}, {:?}]:\n    open(p, 'rb').read()\n\
         print('read', flush=True)\n\
         sys.stdin.read()",
        password.to_str().unwrap(),
        key.to_str().unwrap(),
        ca_path.to_str().unwrap()
    );
    let reader = trustdrift_e2e::spawn_after_read(
        Command::new("/usr/bin/python3").args(["-I", "-S", "-c", &script]),
    );
    let p = daemon.wait_for("listed with its three files", reader.pid(), |p| {
        p["files"].as_array().is_some_and(|f| f.len() == 3)
    });
    let forbidden = [
        sha256_hex(secret.as_bytes()),
        sha256_hex(ca.key_pem.as_bytes()),
    ];
    let bodies = [
        daemon.get("/processes").1.to_string(),
        daemon
            .get(&format!("/processes/{}", reader.pid()))
            .1
            .to_string(),
        daemon.get("/stores").1.to_string(),
        daemon.metrics(),
    ];
    for body in &bodies {
        for digest in &forbidden {
            assert!(
                !body.contains(digest.as_str()),
                "{digest} published: {body}"
            );
        }
    }
    // Certificates are public: the CA's file is fingerprinted, as any certificate tool does.
    let files = p["files"].as_array().unwrap();
    let of = |path: &Path| {
        files
            .iter()
            .find(|f| f["path"] == path.to_str().unwrap())
            .unwrap()
    };
    assert!(of(&ca_path)["read_version"]["sha256"].is_string(), "{p}");
    assert!(of(&password)["read_version"]["sha256"].is_null(), "{p}");
    assert!(of(&key)["read_version"]["sha256"].is_null(), "{p}");
    // Nor does the state file keep them (it is written at the latest on exit).
    drop(daemon);
    let saved = fs::read_to_string(state.join("ledger.json")).expect("the state file");
    for digest in &forbidden {
        assert!(
            !saved.contains(digest.as_str()),
            "{digest} in the state file"
        );
    }
    drop(reader);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_service_that_opens_its_bundle_relative_to_its_directory_and_then_leaves_it_is_still_judged() {
    let dir = TempDir::new("daemonize");
    let bundle = dir.join("bundle.pem");
    fs::write(&bundle, Cert::ca("Daemonizing CA").pem).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    // The classic daemonization: load relative to where it was started, then chdir("/").
    let script = format!(
        "import os, sys\n\
         os.chdir({:?})\n\
         fd = os.open('bundle.pem', os.O_RDONLY); os.read(fd, 1 << 20); os.close(fd)\n\
         os.chdir('/')\n\
         print('read', flush=True)\n\
         sys.stdin.read()",
        dir.path().to_str().unwrap()
    );
    let service = trustdrift_e2e::spawn_after_read(
        Command::new("/usr/bin/python3").args(["-I", "-S", "-c", &script]),
    );
    let p = daemon.wait_for("fresh", service.pid(), |p| p["verdict"] == "fresh");
    assert_eq!(
        p["files"][0]["resolved"],
        bundle.to_str().unwrap(),
        "judged by the file it opened: {p}"
    );
    replace_atomically(&bundle, &Cert::ca("Daemonizing CA, renewed").pem);
    daemon.wait_for("stale", service.pid(), |p| p["verdict"] == "stale");
}

#[test]
fn a_process_that_rewrites_the_path_after_its_open_cannot_make_the_daemon_read_what_it_named() {
    let dir = TempDir::new("rewrite");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(dir.join("open")).unwrap();
    fs::create_dir(dir.join("priv")).unwrap();
    fs::set_permissions(dir.join("open"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.join("priv"), fs::Permissions::from_mode(0o700)).unwrap();
    // Same length, so every rewrite is of the whole path.
    let opened = dir.join("open/readable.pem");
    let named = dir.join("priv/secret00.pem");
    let public = Cert::ca("Readable CA");
    let private = Cert::ca("Root-only CA");
    fs::write(&opened, &public.pem).unwrap();
    fs::set_permissions(&opened, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&named, &private.pem).unwrap();
    fs::set_permissions(&named, fs::Permissions::from_mode(0o600)).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    // As `nobody`: it can open the first, never the second.
    let racer = Guarded::spawn(
        Command::new(env!("CARGO_BIN_EXE_path_racer"))
            .arg(&opened)
            .arg(&named)
            .arg("60")
            .stdout(Stdio::null()),
    );
    let named_text = named.to_str().unwrap();
    let p = daemon.wait_for("caught naming the file it did not open", racer.pid(), |p| {
        p["files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["path"] == named_text))
    });
    let claimed = p["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == named_text)
        .unwrap();
    assert_eq!(claimed["verdict"], "unverified", "{p}");
    assert!(claimed["read_version"].is_null(), "{p}");
    // The root-only file was neither read nor tracked.
    let (_, stores) = daemon.get("/stores");
    let stores_text = stores.to_string();
    assert!(!stores_text.contains(named_text), "{stores}");
    assert!(!stores_text.contains(&private.sha256), "{stores}");
    assert!(
        !daemon
            .get("/processes")
            .1
            .to_string()
            .contains(&private.sha256)
    );
    // What it really opened is judged as usual.
    let opened_text = opened.to_str().unwrap();
    let real = p["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == opened_text);
    if let Some(real) = real {
        assert_eq!(real["verdict"], "fresh", "{p}");
    }
    drop(racer);
    healthy(&daemon);
}
