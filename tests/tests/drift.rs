//! The drift engine, end to end: real processes read real trust files, the files change
//! under them, and `GET /processes` says who is stale, since when, and what differs.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use trustdrift_e2e::{
    Cert, Daemon, Guarded, Reloading, TLS_AGENT, TempDir, Value, bundle, replace_atomically,
    sha256_of, shas,
};

/// A long-running TLS agent: [`TLS_AGENT`] in one of its roles.
struct Agent(Reloading);

impl Agent {
    /// `prefix` runs the interpreter through a wrapper (unshare, chroot); `python` is the
    /// interpreter as the wrapper sees it.
    fn spawn(prefix: &[&str], python: &str, args: &[&str]) -> Self {
        let mut cmd = if prefix.is_empty() {
            Command::new(python)
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(python);
            c
        };
        cmd.args(["-I", "-c", TLS_AGENT])
            .args(args)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        Self(Reloading::spawn(&mut cmd))
    }

    fn client(bundle: &Path) -> Self {
        Self::spawn(
            &[],
            "/usr/bin/python3",
            &["client", bundle.to_str().unwrap()],
        )
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn reload(&self) {
        self.0.reload();
    }
}

fn verdict_is(v: &'static str) -> impl Fn(&Value) -> bool {
    move |p| p["verdict"] == v
}

fn file<'a>(p: &'a Value, path: &Path) -> &'a Value {
    p["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["path"] == path.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} not among the files of {p}", path.display()))
}

#[test]
fn an_agent_that_read_its_bundle_once_is_stale_when_a_ca_is_added_and_fresh_after_sighup() {
    let dir = TempDir::new("agent");
    let path = dir.join("ca-bundle.pem");
    let (old_ca, new_ca) = (Cert::ca("Old Internal CA"), Cert::ca("New Internal CA"));
    fs::write(&path, bundle(&[&old_ca])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = Agent::client(&path);
    let pid = agent.pid();
    daemon.wait_for("fresh", pid, verdict_is("fresh"));

    // The operator adds the new CA the way update-ca-certificates does: a new bundle
    // renamed over the old one.
    replace_atomically(&path, &bundle(&[&old_ca, &new_ca]));
    let stale = daemon.wait_for("stale", pid, verdict_is("stale"));
    let f = file(&stale, &path);
    assert_eq!(f["kind"], "ca");
    assert_eq!(shas(&f["missing_cas"]), vec![new_ca.sha256.clone()], "{f}");
    assert!(
        f["missing_cas"][0]["subject"]
            .as_str()
            .unwrap()
            .contains("New Internal CA")
    );
    assert!(shas(&f["removed_cas_trusted"]).is_empty());
    assert!(stale["stale_since"].is_string());

    agent.reload();
    let fresh = daemon.wait_for("fresh again after SIGHUP", pid, verdict_is("fresh"));
    assert_eq!(
        file(&fresh, &path)["read_version"]["sha256"],
        file(&fresh, &path)["current_version"]["sha256"]
    );
}

#[test]
fn a_ca_removed_from_the_bundle_is_reported_as_still_trusted() {
    let dir = TempDir::new("removed");
    let path = dir.join("bundle.pem");
    let (keep, revoked) = (Cert::ca("Kept Root"), Cert::ca("Compromised Root"));
    fs::write(&path, bundle(&[&keep, &revoked])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = Agent::client(&path);
    daemon.wait_for("fresh", agent.pid(), verdict_is("fresh"));
    fs::write(&path, bundle(&[&keep])).unwrap();
    let p = daemon.wait_for("stale", agent.pid(), verdict_is("stale"));
    let f = file(&p, &path);
    assert_eq!(
        shas(&f["removed_cas_trusted"]),
        vec![revoked.sha256.clone()],
        "{f}"
    );
    assert!(shas(&f["missing_cas"]).is_empty());
}

#[test]
fn a_touch_and_an_identical_rewrite_are_not_drift() {
    let dir = TempDir::new("touch");
    let path = dir.join("bundle.pem");
    let marker = dir.join("marker.pem");
    let ca = Cert::ca("Unchanging Root");
    fs::write(&path, bundle(&[&ca])).unwrap();
    fs::write(&marker, bundle(&[&ca])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = Agent::client(&path);
    let witness = Agent::client(&marker);
    daemon.wait_for("fresh", agent.pid(), verdict_is("fresh"));
    daemon.wait_for("fresh", witness.pid(), verdict_is("fresh"));

    let status = Command::new("touch").arg(&path).status().unwrap();
    assert!(status.success());
    replace_atomically(&path, &bundle(&[&ca]));
    // A real change to another file, made after: once the daemon reports it, it has
    // handled the touch and the rewrite too.
    fs::write(&marker, bundle(&[&ca, &Cert::ca("Witness CA")])).unwrap();
    daemon.wait_for("stale", witness.pid(), verdict_is("stale"));
    let p = daemon.process(agent.pid()).expect("listed");
    assert_eq!(p["verdict"], "fresh", "{p}");
}

#[test]
fn a_leaf_that_expires_while_its_renewal_is_on_disk_is_expired_in_memory() {
    let dir = TempDir::new("expiry");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = Cert::ca("Issuing CA");
    let short = ca.leaf("api.internal", Duration::from_secs(6));
    fs::write(&cert, &short.pem).unwrap();
    fs::write(&key, &short.key_pem).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let server = Agent::spawn(
        &[],
        "/usr/bin/python3",
        &["server", cert.to_str().unwrap(), key.to_str().unwrap()],
    );
    let pid = server.pid();
    daemon.wait_for("fresh", pid, verdict_is("fresh"));
    // cert-manager renews: new key and certificate, the server keeps the old ones.
    let renewed = ca.leaf("api.internal", Duration::from_secs(86400));
    replace_atomically(&key, &renewed.key_pem);
    replace_atomically(&cert, &renewed.pem);
    let stale = daemon.wait_for("stale", pid, verdict_is("stale"));
    assert_eq!(file(&stale, &cert)["kind"], "identity");
    assert_eq!(file(&stale, &key)["kind"], "identity");
    let expired = daemon.wait_for("expired in memory", pid, verdict_is("expired_in_memory"));
    let f = file(&expired, &cert);
    assert_eq!(
        shas(&f["expired_in_memory"]),
        vec![short.sha256.clone()],
        "{f}"
    );
    server.reload();
    daemon.wait_for("fresh after reload", pid, verdict_is("fresh"));
}

/// Runs the agent in a private mount namespace after `setup` (shell commands run
/// inside it), optionally chrooted into `root`, as a container runtime would.
fn in_private_namespace(setup: &str, root: Option<&Path>, args: &[&str]) -> Agent {
    let launcher = root.map_or(String::new(), |r| format!("chroot {} ", r.display()));
    let wrapper = format!("{setup} && exec {launcher}\"$0\" \"$@\"");
    Agent::spawn(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &wrapper,
        ],
        "/usr/bin/python3",
        args,
    )
}

#[test]
fn a_change_inside_a_private_mount_namespace_is_drift_only_for_the_process_inside() {
    let dir = TempDir::new("mntns");
    let host_certs = dir.join("certs");
    let ns_certs = dir.join("ns-certs");
    fs::create_dir_all(&host_certs).unwrap();
    fs::create_dir_all(&ns_certs).unwrap();
    let bundle_path = host_certs.join("bundle.pem");
    let ca = Cert::ca("Shared Root");
    fs::write(&bundle_path, bundle(&[&ca])).unwrap();
    fs::write(ns_certs.join("bundle.pem"), bundle(&[&ca])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let host = Agent::client(&bundle_path);
    // Inside: the same path, but the namespace has its own certs folder mounted there.
    let setup = format!(
        "mount --bind {} {}",
        ns_certs.display(),
        host_certs.display()
    );
    let inside = in_private_namespace(&setup, None, &["client", bundle_path.to_str().unwrap()]);
    daemon.wait_for("fresh", host.pid(), verdict_is("fresh"));
    daemon.wait_for("fresh", inside.pid(), verdict_is("fresh"));

    // A change on the host: the host agent drifts, the one inside does not see it.
    fs::write(&bundle_path, bundle(&[&ca, &Cert::ca("Host Only CA")])).unwrap();
    daemon.wait_for("stale", host.pid(), verdict_is("stale"));
    assert_eq!(daemon.process(inside.pid()).unwrap()["verdict"], "fresh");

    // A change inside (to the namespace's own folder): only the agent inside drifts.
    let inside_ca = Cert::ca("Namespace Only CA");
    fs::write(ns_certs.join("bundle.pem"), bundle(&[&ca, &inside_ca])).unwrap();
    let p = daemon.wait_for("stale", inside.pid(), verdict_is("stale"));
    assert_eq!(
        shas(&file(&p, &bundle_path)["missing_cas"]),
        vec![inside_ca.sha256.clone()]
    );
}

/// A minimal container root: the host's /usr read-only, the usual merged-usr links, and
/// whatever the test puts under it. Returns the root and the setup to run inside the
/// container's mount namespace.
fn container_root(base: &Path) -> (PathBuf, String) {
    let root = base.join("rootfs");
    for d in ["usr", "certs", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for (link, target) in [
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("bin", "usr/bin"),
    ] {
        symlink(target, root.join(link)).unwrap();
    }
    let setup = format!("mount --bind -o ro /usr {}/usr", root.display());
    (root, setup)
}

#[test]
fn a_symlink_in_a_container_is_resolved_inside_it_never_on_the_host() {
    let dir = TempDir::new("escape");
    let (root, setup) = container_root(dir.path());
    // A path that exists on the host and, with other content, inside the container.
    let shared = dir.join("shared.pem");
    let (host_ca, inside_ca) = (Cert::ca("Host File CA"), Cert::ca("Container File CA"));
    fs::write(&shared, bundle(&[&host_ca])).unwrap();
    let inside_shared = root.join(shared.strip_prefix("/").unwrap());
    fs::create_dir_all(inside_shared.parent().unwrap()).unwrap();
    fs::write(&inside_shared, bundle(&[&inside_ca])).unwrap();
    // In the container, /certs/ca.pem -> that absolute path.
    symlink(&shared, root.join("certs/ca.pem")).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let agent = in_private_namespace(&setup, Some(&root), &["client", "/certs/ca.pem"]);
    let p = daemon.wait_for("fresh", agent.pid(), verdict_is("fresh"));
    let f = file(&p, Path::new("/certs/ca.pem"));
    // What the daemon read is the container's file, not the host's.
    assert_eq!(f["resolved"], shared.to_str().unwrap());
    assert_eq!(
        f["read_version"]["sha256"],
        sha256_of(&inside_shared),
        "{f}"
    );
    assert_ne!(f["read_version"]["sha256"], sha256_of(&shared));

    // The host's file changes: nothing changes for the container.
    fs::write(&shared, bundle(&[&host_ca, &Cert::ca("Another Host CA")])).unwrap();
    // The container's own file changes: that is drift, naming the container's CA.
    let added = Cert::ca("Added In Container");
    fs::write(&inside_shared, bundle(&[&inside_ca, &added])).unwrap();
    let p = daemon.wait_for("stale", agent.pid(), verdict_is("stale"));
    assert_eq!(
        shas(&file(&p, Path::new("/certs/ca.pem"))["missing_cas"]),
        vec![added.sha256.clone()],
        "only the container's own change counts"
    );
}

#[test]
fn a_process_started_before_the_daemon_is_unverified_not_stale() {
    let dir = TempDir::new("before");
    let certs = dir.join("system-certs");
    fs::create_dir_all(&certs).unwrap();
    let ca = Cert::ca("Preexisting Root");
    fs::write(certs.join("ca-certificates.crt"), bundle(&[&ca])).unwrap();
    // Its own copy of the system store, so the test never touches the host's.
    let setup = format!("mount --bind {} /etc/ssl/certs", certs.display());
    let agent = in_private_namespace(&setup, None, &["default", "-"]);
    // A second one holds the bundle open: what it holds is known even though it predates
    // the daemon.
    let holder_script = format!(
        "import sys\nf = open({:?}, 'rb')\nprint('loaded', flush=True)\nsys.stdin.read()",
        certs.join("ca-certificates.crt").to_str().unwrap()
    );
    let mut holder = Guarded::spawn(
        Command::new("/usr/bin/python3")
            .args(["-I", "-c", &holder_script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    fs::write(
        certs.join("ca-certificates.crt"),
        bundle(&[&ca, &Cert::ca("Added After Start")]),
    )
    .unwrap();
    let p = daemon.wait_for("unverified", agent.pid(), verdict_is("unverified"));
    assert_eq!(p["confidence"], "unverified");
    assert_eq!(p["origin"], "tls_capable");
    assert!(p["tls_library"].as_str().unwrap().starts_with("lib"));
    let held = daemon.wait_for("stale", holder.pid(), verdict_is("stale"));
    assert_eq!(held["origin"], "seeded");
    // Never counted as stale: the unverified agent is not in the stale list.
    let (status, stale) = daemon.get("/processes?verdict=stale");
    assert_eq!(status, 200);
    assert!(
        stale
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["pid"] != agent.pid())
    );
}
