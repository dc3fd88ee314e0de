//! Scenario 1 — the agent that read its trust store once (seed 000): a long-running
//! HTTPS client loads the system bundle at start; an operator adds an internal CA the
//! Debian way; the agent keeps rejecting an upstream signed by it until it reloads.
//!
//! The system store is the agent's own copy: the agent runs in a private mount namespace
//! where /etc/ssl/certs and /usr/local/share/ca-certificates are copies, so the operator's
//! `update-ca-certificates` (run inside that namespace with nsenter) never touches the
//! machine's real store.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir};

use crate::support::{file, noticed, openssl_server, record, require, series, shas};

/// The agent: builds its default TLS context once (and on SIGHUP), and on "connect
/// <port>" does a real handshake with that context, answering "ok" or "fail <why>".
const AGENT: &str = r#"
import os, signal, socket, ssl, sys
def load(*_):
    global ctx
    # The system bundle, read once (OpenSSL's default CAfile), as the agent of the
    # incident did; no lazily consulted hash directory.
    ctx = ssl.create_default_context(cafile=ssl.get_default_verify_paths().openssl_cafile)
    # Unbuffered: the handler may run while the main loop is inside print().
    os.write(1, b"loaded\n")
signal.signal(signal.SIGHUP, load)
load()
for line in sys.stdin:
    port = int(line.split()[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="upstream.internal") as tls:
                pass
        print("ok", flush=True)
    except ssl.SSLError as e:
        print("fail", e.reason, flush=True)
    except OSError as e:
        print("fail", type(e).__name__, e, flush=True)
"#;

struct Agent {
    child: Guarded,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Agent {
    fn next(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent answered")
    }

    fn connect(&mut self, port: u16) -> String {
        writeln!(self.stdin, "connect {port}").unwrap();
        self.stdin.flush().unwrap();
        self.next()
    }

    fn reload(&self) {
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGHUP) };
        assert_eq!(self.next(), "loaded");
    }
}

/// The machine's store, copied for the agent's namespace.
struct Store {
    _dir: TempDir,
    certs: std::path::PathBuf,
    local: std::path::PathBuf,
}

fn copy_store() -> Store {
    let dir = TempDir::new("agent-store");
    let certs = dir.join("etc-ssl-certs");
    let local = dir.join("local-ca-certificates");
    fs::create_dir_all(&local).unwrap();
    // Symlinks into /usr/share/ca-certificates are kept as they are.
    let status = Command::new("cp")
        .args(["-a", "/etc/ssl/certs"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(status.success());
    Store {
        _dir: dir,
        certs,
        local,
    }
}

fn spawn_agent(store: &Store) -> Agent {
    let setup = format!(
        "mount --bind {} /etc/ssl/certs && mount --bind {} /usr/local/share/ca-certificates \
         && exec \"$0\" \"$@\"",
        store.certs.display(),
        store.local.display()
    );
    let mut child = Guarded::spawn(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &setup])
            .args(["/usr/bin/python3", "-I", "-c", AGENT])
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let stdin = child.0.stdin.take().unwrap();
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let agent = Agent {
        child,
        stdin,
        lines,
    };
    assert_eq!(agent.next(), "loaded");
    agent
}

/// An upstream on loopback whose certificate a new internal CA signed.
fn upstream(dir: &Path, ca: &Cert) -> (Guarded, u16) {
    let leaf = ca.leaf("upstream.internal", Duration::from_secs(3600));
    let (cert, key) = (dir.join("upstream.crt"), dir.join("upstream.key"));
    fs::write(&cert, format!("{}{}", leaf.pem, ca.pem)).unwrap();
    fs::write(&key, &leaf.key_pem).unwrap();
    openssl_server(&["-quiet"], &cert, &key)
}

/// Runs `cmd` inside the agent's mount namespace, as the operator on that host would.
fn in_agent_namespace(agent: &Agent, cmd: &[&str]) {
    let out = Command::new("nsenter")
        .arg("--target")
        .arg(agent.child.pid().to_string())
        .arg("--mount")
        .args(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stale_series(daemon: &Daemon) -> usize {
    series(
        &daemon.metrics(),
        "trustdrift_stale_processes",
        &["comm=\"python3\"", "kind=\"ca\"", "confidence=\"observed\""],
    )
    .len()
}

/// Both ways operators add a CA; the rest of the story is the same.
fn replay(name: &str, add_ca: impl Fn(&Agent, &Store, &Cert)) {
    require("update-ca-certificates", "ca-certificates");
    require("openssl", "openssl");
    require("nsenter", "util-linux");
    let dir = TempDir::new("agent");
    let store = copy_store();
    let internal = Cert::ca("Example Internal Upstream CA");
    let (_server, port) = upstream(dir.path(), &internal);
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let mut agent = spawn_agent(&store);
    let pid = agent.child.pid();
    let fresh = daemon.wait_for("fresh", pid, |p| p["verdict"] == "fresh");
    let bundle = fresh["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["resolved"] == "/etc/ssl/certs/ca-certificates.crt")
        .unwrap_or_else(|| panic!("the agent read the system bundle: {fresh}"))["path"]
        .as_str()
        .unwrap()
        .to_owned();
    // The upstream is not trusted yet: a genuine rejection.
    assert!(agent.connect(port).starts_with("fail"));

    let changed = Instant::now();
    add_ca(&agent, &store, &internal);
    let stale = noticed(&daemon, name, "stale", pid, changed, |p| {
        p["verdict"] == "stale"
    });
    // update-ca-certificates rebuilds the whole bundle from its configuration, so a
    // machine whose bundle was edited by hand can show other differences too; the new CA
    // is always among the missing ones.
    let f = file(&stale, &bundle);
    assert!(
        shas(&f["missing_cas"]).contains(&internal.sha256),
        "the new CA is named as missing: {f}"
    );
    assert!(!shas(&f["removed_cas_trusted"]).contains(&internal.sha256));
    assert!(stale_series(&daemon) >= 1, "the alert's series is there");
    // The alert predicts the failure: the host trusts the CA now, the agent does not.
    let answer = agent.connect(port);
    assert!(
        answer.starts_with("fail"),
        "a stale agent rejects: {answer}"
    );

    let reloaded = Instant::now();
    agent.reload();
    noticed(&daemon, name, "fresh after reload", pid, reloaded, |p| {
        p["verdict"] == "fresh"
    });
    assert_eq!(
        agent.connect(port),
        "ok",
        "after its reload the agent trusts it"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while stale_series(&daemon) > 0 {
        assert!(Instant::now() < deadline, "the stale series did not clear");
        thread::sleep(Duration::from_millis(100));
    }
    record(name, "series cleared", reloaded.elapsed());
}

#[test]
fn an_agent_keeps_rejecting_an_upstream_after_update_ca_certificates_until_it_reloads() {
    replay(
        "agent-trust-store/update-ca-certificates",
        |agent, store, ca| {
            fs::write(store.local.join("example-internal.crt"), &ca.pem).unwrap();
            in_agent_namespace(agent, &["update-ca-certificates"]);
        },
    );
}

#[test]
fn an_agent_keeps_rejecting_an_upstream_after_its_bundle_is_regenerated_and_renamed() {
    replay("agent-trust-store/atomic-rename", |agent, store, ca| {
        // A configuration-management tool regenerates the bundle and renames it over.
        let bundle = store.certs.join("ca-certificates.crt");
        let mut content = fs::read_to_string(&bundle).unwrap();
        content.push_str(&ca.pem);
        let tmp = store.certs.join(".ca-certificates.crt.new");
        fs::write(&tmp, content).unwrap();
        in_agent_namespace(
            agent,
            &[
                "mv",
                "/etc/ssl/certs/.ca-certificates.crt.new",
                "/etc/ssl/certs/ca-certificates.crt",
            ],
        );
    });
}
