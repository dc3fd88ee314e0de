//! The daemon's own memory under hostile load: stores built to cost it the most (16 MiB
//! of distinct minimal certificates each) and clients that ask for the largest answers
//! and never read them. It stays within the memory limit it is deployed with, keeps
//! answering `/readyz`, and says what it did not keep.

use std::{
    fs,
    io::Write,
    net::TcpStream,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{Daemon, TempDir, Value, minimal_certificates, repo};

use super::{counter, reader};

const STORES: usize = 20;
/// Each store's size: as large as the daemon reads by default (`catalog.max_file_bytes`).
const STORE_BYTES: usize = 16 << 20;
const STALLED_CLIENTS: usize = 256;
/// `catalog.max_certificates_per_file`'s default.
const CERTS_READ: u64 = 4096;

/// The memory limit of the trustdrift container in the shipped DaemonSet, in bytes.
fn deployed_memory_limit() -> u64 {
    let manifest = fs::read_to_string(repo().join("deploy/base/daemonset.yaml"))
        .expect("deploy/base/daemonset.yaml");
    let lines: Vec<&str> = manifest.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "limits:")
        .expect("the daemon's resources have limits");
    let value = lines[at + 1..]
        .iter()
        .take(3)
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .expect("a memory limit")
        .trim();
    let mib: u64 = value
        .strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a limit in Mi, not {value:?}"));
    mib << 20
}

/// A memory cgroup holding the daemon under the deployed limit, as the kubelet would:
/// past it the kernel reclaims, then kills. Removed on drop (what is left in it goes back
/// to the parent first).
struct MemoryCgroup {
    dir: PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    fn new(limit: u64) -> Option<Self> {
        let name = format!("trustdrift-e2e-memory-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
        let base = if v1 {
            PathBuf::from("/sys/fs/cgroup/memory")
        } else {
            let root = PathBuf::from("/sys/fs/cgroup");
            let enabled = fs::read_to_string(root.join("cgroup.subtree_control")).ok()?;
            if !enabled.split_whitespace().any(|c| c == "memory") {
                return None;
            }
            root
        };
        let dir = base.join(name);
        fs::create_dir(&dir).ok()?;
        let group = Self { dir, v1 };
        let file = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        fs::write(group.dir.join(file), limit.to_string()).ok()?;
        Some(group)
    }

    fn enter(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .expect("moving the daemon into its memory cgroup");
    }

    /// The most the group has used, page cache and kernel memory included.
    fn peak(&self) -> Option<u64> {
        let file = if self.v1 {
            "memory.max_usage_in_bytes"
        } else {
            "memory.peak"
        };
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let (Ok(procs), Some(parent)) = (
            fs::read_to_string(self.dir.join("cgroup.procs")),
            self.dir.parent(),
        ) {
            for pid in procs.lines() {
                let _ = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// A client that asks for `path` and reads nothing: a receive buffer of a few KiB, so
/// the daemon's side fills at once.
fn stalled_client(port: u16, path: &str) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket we own, with a valid int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    (&s).write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .expect("sending the request");
    s
}

#[test]
fn stalled_clients_and_huge_stores_keep_the_daemon_within_its_memory_limit() {
    let limit = deployed_memory_limit();
    let dir = TempDir::new("memory");
    // Distinct certificates enough to fill a store; each store holds them in another
    // order, so every store is content of its own, parsed on its own.
    let one = minimal_certificates(1)[0].len();
    let certs = minimal_certificates(STORE_BYTES / one + 64);
    let mut stores = Vec::new();
    for i in 0..STORES {
        let mut text = String::with_capacity(STORE_BYTES);
        for c in certs.iter().cycle().skip(i * 997).take(certs.len()) {
            if text.len() + c.len() > STORE_BYTES {
                break;
            }
            text.push_str(c);
        }
        let path = dir.join(format!("store-{i:02}.pem"));
        fs::write(&path, text).unwrap();
        stores.push(path);
    }
    let prefix = format!("{}/", dir.path().display());
    let Some(daemon) = Daemon::start(&[
        "--no-default-paths",
        "--prefix",
        &prefix,
        // A client that stops reading is closed after this long.
        "--set",
        "api.request_timeout=3s",
    ]) else {
        return;
    };
    let cgroup = MemoryCgroup::new(limit);
    match &cgroup {
        Some(group) => group.enter(daemon.pid()),
        None => eprintln!("no memory cgroup here: the peak is measured as resident memory only"),
    }

    let paths: Vec<&Path> = stores.iter().map(PathBuf::as_path).collect();
    let agent = reader(&paths);
    daemon.wait_for("listed with every store parsed", agent.pid(), |p| {
        p["files"].as_array().is_some_and(|files| {
            files.len() == STORES
                && files
                    .iter()
                    .all(|f| f["read_version"]["certificates"].as_u64() == Some(CERTS_READ))
        })
    });

    // The largest answers, asked for and never read.
    let port = daemon.port;
    let clients: Vec<TcpStream> = (0..STALLED_CLIENTS)
        .map(|i| stalled_client(port, if i % 2 == 0 { "/stores" } else { "/processes" }))
        .collect();
    let started = Instant::now();
    let mut peak_rss = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let (status, body) = daemon.get("/readyz");
        assert_eq!(
            status, 200,
            "readyz with {STALLED_CLIENTS} stalled clients: {body}"
        );
        peak_rss = peak_rss.max(status_bytes(daemon.pid(), "VmRSS"));
        thread::sleep(Duration::from_millis(100));
    }
    // They are closed once they have stalled for api.request_timeout.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let closed = counter(
            &daemon.metrics(),
            "trustdrift_api_refused_total",
            "reason=\"connection_timeout\"",
        );
        if closed as usize >= STALLED_CLIENTS / 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{closed} stalled clients closed:\n{}",
            daemon.log_tail(20)
        );
        thread::sleep(Duration::from_millis(250));
    }
    drop(clients);

    let hwm = status_bytes(daemon.pid(), "VmHWM");
    let group_peak = cgroup.as_ref().and_then(MemoryCgroup::peak);
    eprintln!(
        "memory under {STALLED_CLIENTS} stalled clients and {STORES} stores of 16 MiB: \
         peak resident {} MiB (sampled {} MiB), cgroup peak {:?} MiB, limit {} MiB",
        hwm >> 20,
        peak_rss >> 20,
        group_peak.map(|b| b >> 20),
        limit >> 20
    );
    assert!(hwm < limit, "peak resident {hwm} over the limit {limit}");
    if let Some(peak) = group_peak {
        assert!(peak < limit, "cgroup peak {peak} at the limit {limit}");
    }

    // A client that reads gets everything, and what was not read is said and counted.
    let (status, body) = daemon.get("/stores");
    assert_eq!(status, 200);
    let listed: Vec<&Value> = body["stores"]
        .as_array()
        .expect("stores")
        .iter()
        .filter(|s| s["path"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .collect();
    assert_eq!(listed.len(), STORES, "{body:#}");
    for store in listed {
        assert_eq!(
            store["certificates"].as_array().map(Vec::len),
            Some(CERTS_READ as usize)
        );
        let errors = store["current"]["errors"].to_string();
        assert!(errors.contains("more than 4096 certificates"), "{errors}");
    }
    let metrics = daemon.metrics();
    assert!(
        counter(
            &metrics,
            "trustdrift_events_lost_total",
            "reason=\"catalog_certificates_dropped\""
        ) > 0
    );
    let (status, _) = daemon.get("/readyz");
    assert_eq!(status, 200);
}
