//! The monitoring stack, for real and on loopback: Prometheus, Alertmanager, a webhook
//! receiver standing in for the pager, and a process that trustdrift attributes to a
//! Kubernetes pod. Each is stopped and cleaned up on drop, a failed test included.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{
    Guarded, Reloading, TLS_AGENT, TempDir, Value, free_port, has_program, http_get, in_ci,
    random_hex,
};

/// Whether `program` is installed: in CI a missing one fails the test (saying how to
/// install it), elsewhere the test is skipped with that message.
pub fn require(program: &str) -> bool {
    let found = has_program(program);
    if !found {
        let how = "apt-get install -y prometheus prometheus-alertmanager \
                   (cargo xtask setup installs them)";
        assert!(!in_ci(), "CI=true and {program} is missing: {how}");
        eprintln!("SKIPPED: {program} is missing: {how}");
    }
    found
}

/// `s` percent-encoded for a URL query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `probe` until it gives a value or `timeout` passes; then panics with `what` and
/// the last thing `describe` says.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {timeout:?}\n{}", describe());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A server started with its own storage and a free loopback port, killed on drop.
pub struct Server {
    pub port: u16,
    child: Guarded,
    log: PathBuf,
    /// Its configuration and storage; removed after the process is gone.
    _dir: TempDir,
}

impl Server {
    fn start(name: &str, program: &str, args: impl FnOnce(&TempDir, u16) -> Vec<String>) -> Self {
        let dir = TempDir::new(name);
        let port = free_port();
        let log = dir.join("log");
        let child = Guarded::spawn(
            Command::new(program)
                .args(args(&dir, port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("a log file")),
        );
        let mut server = Self {
            port,
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.ready() {
            let exited = matches!(server.child.0.try_wait(), Ok(Some(_)));
            assert!(
                !exited && Instant::now() < deadline,
                "{program} did not become ready:\n{}",
                server.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn ready(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.get("/-/ready").0 == 200
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http_get(self.port, path)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A real Alertmanager that notifies `webhook`, with timings short enough for a test.
pub fn alertmanager(webhook: &Webhook) -> Server {
    Server::start("alertmanager", "prometheus-alertmanager", |dir, port| {
        let config = dir.join("alertmanager.yml");
        fs::write(
            &config,
            format!(
                "route:\n  receiver: oncall\n  group_by: [alertname, pod, comm]\n  \
                 group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: oncall\n    webhook_configs:\n      \
                 - url: http://127.0.0.1:{}/\n        send_resolved: true\n",
                webhook.port
            ),
        )
        .expect("writing the Alertmanager configuration");
        vec![
            format!("--config.file={}", config.display()),
            format!("--storage.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            // No gossip with other Alertmanagers: this one is alone on loopback.
            "--cluster.listen-address=".into(),
            "--log.level=warn".into(),
        ]
    })
}

/// A real Prometheus that scrapes the daemon on `daemon_port` every second, evaluates
/// `rules` every second and sends alerts to `alertmanager`.
///
/// The target carries the labels Kubernetes service discovery gives a trustdrift pod, and
/// the scrape keeps the daemon's own (honor_labels), as docs/alerts.md asks a deployment
/// to: the alerts must name the stale process's pod, not trustdrift's.
pub fn prometheus(rules: &str, daemon_port: u16, alertmanager: &Server) -> Server {
    Server::start("prometheus", "prometheus", |dir, port| {
        let rules_file = dir.join("trustdrift.rules.yml");
        fs::write(&rules_file, rules).expect("writing the rules");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [{rules}]\n\
                 alerting:\n  alertmanagers:\n    - static_configs:\n        \
                 - targets: ['127.0.0.1:{am}']\n\
                 scrape_configs:\n  - job_name: trustdrift\n    honor_labels: true\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{daemon}']\n        \
                 labels: {{namespace: trustdrift, pod: trustdrift-e2e, container: trustdrift}}\n",
                rules = rules_file.display(),
                am = alertmanager.port,
                daemon = daemon_port,
            ),
        )
        .expect("writing the Prometheus configuration");
        vec![
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            // A firing alert is re-sent every minute by default: should the first send
            // meet an Alertmanager still settling, the test would wait that long.
            "--rules.alert.resend-delay=1s".into(),
            "--log.level=warn".into(),
        ]
    })
}

/// An HTTP endpoint that records every notification Alertmanager posts: the pager.
pub struct Webhook {
    pub port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

fn serve_one(mut stream: TcpStream) -> Option<Value> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    serde_json::from_slice(&body).ok()
}

impl Webhook {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the webhook");
        let port = listener.local_addr().expect("its address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, flag) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        if let Some(v) = serve_one(stream) {
                            sink.lock().unwrap().push(v);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            port,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Every notification received so far (Alertmanager's webhook payloads).
    pub fn notifications(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid
/// host).
fn cgroup2_mount() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    mountinfo
        .lines()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let fields: Vec<&str> = mount.split(' ').collect();
            (fs.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| PathBuf::from(fields[4]))
        })
        .expect("a cgroup2 hierarchy mounted at its root (the tests run as root on the host)")
}

/// The directory containerd keeps the OCI bundles of Kubernetes containers in, where
/// trustdrift reads their namespace, pod and container names.
const CONTAINERD_K8S_BUNDLES: &str = "/run/containerd/io.containerd.runtime.v2.task/k8s.io";

/// The agent, running as `comm`: trustdrift sees every process on the machine, other
/// tests' python3 agents included, and a name of its own keeps this one's alerts apart.
pub struct Agent {
    process: Reloading,
    pub comm: String,
    _exe_dir: TempDir,
}

impl Agent {
    /// Spawns the agent on `bundle`, first moved into `cgroup` if given (as a container
    /// runtime starts a container's process in its cgroup).
    fn spawn(name: &str, bundle: &Path, cgroup: Option<&Path>) -> Self {
        let comm = format!("{name}-{}", &random_hex(3)[..5]);
        let exe_dir = TempDir::new("agent-exe");
        let exe = exe_dir.join(&comm);
        std::os::unix::fs::symlink("/usr/bin/python3", &exe).expect("linking python3");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"if [ -n "$1" ]; then echo $$ > "$1/cgroup.procs" || exit 1; fi; shift; exec "$@""#)
            .arg("sh")
            .arg(cgroup.map_or(PathBuf::new(), Path::to_path_buf))
            .arg(&exe)
            .args(["-I", "-c", TLS_AGENT, "client"])
            .arg(bundle)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        Self {
            process: Reloading::spawn(&mut cmd),
            comm,
            _exe_dir: exe_dir,
        }
    }

    /// An agent on the host, outside any container.
    pub fn on_host(bundle: &Path) -> Self {
        Self::spawn("hostagent", bundle, None)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGHUP, as operators reload a service; returns once it reloaded.
    pub fn reload(&self) {
        self.process.reload();
    }
}

/// An agent that trustdrift attributes to container `container` of pod
/// `namespace/pod`: in a cgroup named as the kubelet and containerd name them, with the
/// OCI bundle annotations containerd writes. Everything is removed on drop.
pub struct PodAgent {
    agent: Option<Agent>,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    cgroups: Vec<PathBuf>,
    bundle_dir: PathBuf,
    /// Bundle directories this test created (deepest first), removed if left empty.
    created: Vec<PathBuf>,
}

impl PodAgent {
    pub fn spawn(namespace: &str, container: &str, bundle: &Path) -> Self {
        let pod = format!("{container}-{}", random_hex(3));
        let pod_uid = {
            let h = random_hex(16);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        };
        let id = random_hex(32);
        let top = cgroup2_mount().join(format!("trustdrift-e2e-{}.slice", random_hex(4)));
        let pod_slice = top.join(format!("kubepods-pod{}.slice", pod_uid.replace('-', "_")));
        let scope = pod_slice.join(format!("cri-containerd-{id}.scope"));
        let mut created = Vec::new();
        let mut dir = PathBuf::from(CONTAINERD_K8S_BUNDLES);
        while !dir.exists() {
            created.push(dir.clone());
            dir.pop();
        }
        let bundle_dir = Path::new(CONTAINERD_K8S_BUNDLES).join(&id);
        let mut me = Self {
            agent: None,
            namespace: namespace.to_owned(),
            pod: pod.clone(),
            container: container.to_owned(),
            cgroups: vec![scope.clone(), pod_slice, top],
            bundle_dir: bundle_dir.clone(),
            created,
        };
        fs::create_dir_all(&scope).expect("creating the container's cgroup");
        fs::create_dir_all(&bundle_dir).expect("creating the container's bundle directory");
        fs::write(
            bundle_dir.join("config.json"),
            serde_json::json!({"annotations": {
                "io.kubernetes.cri.sandbox-namespace": namespace,
                "io.kubernetes.cri.sandbox-name": pod,
                "io.kubernetes.cri.sandbox-uid": pod_uid,
                "io.kubernetes.cri.container-name": container,
                "io.kubernetes.cri.container-type": "container",
            }})
            .to_string(),
        )
        .expect("writing the OCI bundle annotations");
        me.agent = Some(Agent::spawn("podagent", bundle, Some(&scope)));
        me
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("spawned")
    }
}

impl Drop for PodAgent {
    fn drop(&mut self) {
        // The process first: a cgroup with a process in it cannot be removed.
        drop(self.agent.take());
        for cgroup in &self.cgroups {
            let deadline = Instant::now() + Duration::from_secs(5);
            while cgroup.exists() && fs::remove_dir(cgroup).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = fs::remove_dir_all(&self.bundle_dir);
        for dir in &self.created {
            let _ = fs::remove_dir(dir);
        }
    }
}
