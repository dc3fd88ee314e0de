//! A proxy keeps serving the certificate it loaded at start after the file was renewed on
//! disk (the Envoy incident in seed 001): trustdrift must call it stale, then expired in
//! memory once the old leaf's notAfter passes, and fresh again after the remedy (a reload,
//! or for a server that cannot reload, a restart). A real TLS client checks, beside the
//! daemon, which certificate the server actually presents.

use std::{
    fs::{self, File},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use trustdrift_e2e::{
    Cert, Daemon, Guarded, TempDir, Value, free_port, replace_atomically, sha256_of,
};

use crate::support::{file, noticed, openssl_server_on, require, shas};

/// Short enough to expire within the test, long enough that start-up, the first verdict
/// and the renewal are over before it does, even with every scenario running at once.
const SHORT_LIVED: Duration = Duration::from_secs(8);
const RENEWED: Duration = Duration::from_secs(86400);
const SERVER_NAME: &str = "proxy.internal";

/// The SHA-256 fingerprint (lowercase hex) of the certificate a real client is served,
/// `None` while nothing completes a handshake.
fn served(port: u16) -> Option<String> {
    let client = format!(
        "timeout 5 openssl s_client -connect 127.0.0.1:{port} -servername {SERVER_NAME} \
         </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
    );
    let out = Command::new("sh").args(["-c", &client]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, hex) = text.trim().split_once('=')?;
    Some(hex.replace(':', "").to_lowercase())
}

/// Waits until clients are served `want` (`what` names it): a server accepts connections
/// a little after it started, and a reloaded nginx hands over to new workers gradually.
fn wait_served(port: u16, want: &Cert, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        last = served(port);
        if last.as_deref() == Some(want.sha256.as_str()) {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "port {port} never served {what} ({}); last served: {last:?}",
        want.sha256
    );
}

/// notAfter of a PEM certificate, as openssl (not the daemon) reads it.
fn not_after(pem: &str) -> SystemTime {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(pem.as_bytes())
            .expect("writing the certificate to openssl");
    }
    let out = child.wait_with_output().expect("openssl x509");
    // "notAfter=2026-11-23 18:40:00Z"
    let text = String::from_utf8_lossy(&out.stdout);
    let date = text
        .trim()
        .strip_prefix("notAfter=")
        .unwrap_or_else(|| panic!("unexpected openssl output: {text}"))
        .replace(' ', "T");
    humantime::parse_rfc3339(&date).unwrap_or_else(|e| panic!("{date}: {e}"))
}

/// Sleeps until `cert` has expired: the one wait here that is not on the API, since
/// nothing but time makes a certificate expire. Returns the moment it did.
fn until_expired(cert: &Cert) -> Instant {
    let at = not_after(&cert.pem);
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    thread::sleep(left);
    Instant::now()
}

fn pretty(p: &Value) -> String {
    serde_json::to_string_pretty(p).unwrap_or_default()
}

fn verdict_is(v: &'static str) -> impl Fn(&Value) -> bool {
    move |p| p["verdict"] == v
}

/// True once every one of `paths` is listed in a process with verdict `v`. A renewal
/// replaces the key and the certificate one after the other, so the process turns
/// stale on the first; a test that wants both waits for both.
fn files_are<'a>(paths: &'a [&'a Path], v: &'static str) -> impl Fn(&Value) -> bool + 'a {
    move |p| {
        paths.iter().all(|path| {
            p["files"].as_array().is_some_and(|files| {
                files
                    .iter()
                    .any(|f| f["path"] == path_str(path) && f["verdict"] == v)
            })
        })
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// What the daemon says once the old leaf expired while its renewal is on disk: the
/// certificate file names the old leaf, the key is merely stale.
fn assert_expired_in_memory(p: &Value, cert: &Path, key: &Path, old: &Cert) {
    let c = file(p, path_str(cert));
    assert_eq!(c["kind"], "identity", "{}", pretty(p));
    assert_eq!(c["verdict"], "expired_in_memory", "{}", pretty(p));
    assert_eq!(
        shas(&c["expired_in_memory"]),
        vec![old.sha256.clone()],
        "the old leaf should be named as expired in memory: {}",
        pretty(p)
    );
    // The daemon's notAfter is the one openssl reads.
    let daemon_not_after = c["expired_in_memory"][0]["not_after"]
        .as_str()
        .and_then(|s| humantime::parse_rfc3339(s).ok())
        .unwrap_or_else(|| panic!("no readable not_after: {}", pretty(p)));
    assert_eq!(daemon_not_after, not_after(&old.pem), "{}", pretty(p));
    let k = file(p, path_str(key));
    assert_eq!(k["kind"], "identity", "{}", pretty(p));
    assert_eq!(k["verdict"], "stale", "{}", pretty(p));
    assert!(p["stale_since"].is_string(), "{}", pretty(p));
}

/// Fresh on every file, and holding what is on disk.
fn assert_fresh(p: &Value) {
    for f in p["files"].as_array().expect("files") {
        assert_eq!(f["verdict"], "fresh", "{}", pretty(p));
        assert_eq!(
            f["read_version"]["sha256"],
            f["current_version"]["sha256"],
            "{}",
            pretty(p)
        );
        assert!(shas(&f["expired_in_memory"]).is_empty(), "{}", pretty(p));
    }
    assert!(p["stale_since"].is_null(), "{}", pretty(p));
}

/// nginx in the foreground with a master and one worker, on its own config and prefix.
/// Stopped with SIGTERM on drop: SIGKILL (what [`Guarded`] sends) would leave the
/// worker orphaned and still listening.
struct Nginx {
    master: Guarded,
    conf: PathBuf,
    prefix: PathBuf,
    log: PathBuf,
}

impl Nginx {
    fn start(prefix: &Path, port: u16, cert: &Path, key: &Path) -> Self {
        let temp = prefix.join("temp");
        fs::create_dir_all(&temp).expect("nginx temp dir");
        let t = |name: &str| temp.join(name).display().to_string();
        let conf = prefix.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\n\
                 master_process on;\n\
                 worker_processes 1;\n\
                 pid {pid};\n\
                 error_log stderr;\n\
                 events {{}}\n\
                 http {{\n\
                 \x20 access_log off;\n\
                 \x20 client_body_temp_path {body};\n\
                 \x20 proxy_temp_path {proxy};\n\
                 \x20 fastcgi_temp_path {fastcgi};\n\
                 \x20 uwsgi_temp_path {uwsgi};\n\
                 \x20 scgi_temp_path {scgi};\n\
                 \x20 server {{\n\
                 \x20   listen 127.0.0.1:{port} ssl;\n\
                 \x20   server_name {SERVER_NAME};\n\
                 \x20   ssl_certificate {cert};\n\
                 \x20   ssl_certificate_key {key};\n\
                 \x20   location / {{ return 200 \"ok\"; }}\n\
                 \x20 }}\n\
                 }}\n",
                pid = prefix.join("nginx.pid").display(),
                body = t("body"),
                proxy = t("proxy"),
                fastcgi = t("fastcgi"),
                uwsgi = t("uwsgi"),
                scgi = t("scgi"),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .expect("writing nginx.conf");
        let log = prefix.join("nginx.log");
        let nginx = |args: &[&str]| {
            let mut cmd = Command::new("/usr/sbin/nginx");
            // `-e stderr`: never touch the packaged /var/log/nginx.
            cmd.args(["-e", "stderr", "-c"])
                .arg(&conf)
                .arg("-p")
                .arg(prefix)
                .args(args);
            cmd
        };
        let check = nginx(&["-t"]).output().expect("nginx -t");
        assert!(
            check.status.success(),
            "nginx -t rejected the config:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let master = Guarded::spawn(
            nginx(&[])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("nginx log")),
        );
        Self {
            master,
            conf,
            prefix: prefix.to_path_buf(),
            log,
        }
    }

    /// The master: with `daemon off` it is the process spawned, and the one that reads
    /// the certificate (workers inherit it).
    fn pid(&self) -> u32 {
        self.master.pid()
    }

    /// What operators run after a renewal; returns once the signal is sent.
    fn reload(&self) {
        let out = Command::new("/usr/sbin/nginx")
            .args(["-e", "stderr", "-s", "reload", "-c"])
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.prefix)
            .output()
            .expect("nginx -s reload");
        assert!(
            out.status.success(),
            "nginx -s reload failed:\n{}\nnginx log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn workers(&self) -> Vec<i32> {
        let pid = self.pid();
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if !matches!(self.master.0.try_wait(), Ok(None)) {
            return;
        }
        let workers = self.workers();
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.master.0.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // A master that did not stop in time: kill it (Guarded) and its workers.
        for w in workers {
            // SAFETY: these were our master's children a moment ago.
            unsafe { libc::kill(w, libc::SIGKILL) };
        }
    }
}

/// `openssl s_server`: loads its certificate once and can never reload it. Only its
/// identity: no default CA store to verify clients with.
fn s_server(port: u16, cert: &Path, key: &Path) -> Guarded {
    openssl_server_on(
        port,
        &["-www", "-no-CAfile", "-no-CApath", "-no-CAstore"],
        cert,
        key,
    )
}

/// A Kubernetes secret volume as kubelet's atomic writer lays it out: each version in a
/// timestamped directory, `..data` pointing at the current one, and the file names
/// linked through `..data`.
struct SecretVolume {
    dir: PathBuf,
    current: String,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, leaf: &Cert) -> Self {
        fs::create_dir_all(dir).expect("volume dir");
        let mut v = Self {
            dir: dir.to_path_buf(),
            current: String::new(),
            generation: 0,
        };
        v.current = v.write_version(leaf);
        symlink(&v.current, dir.join("..data")).expect("..data");
        for name in ["tls.crt", "tls.key"] {
            symlink(format!("..data/{name}"), dir.join(name)).expect("file link");
        }
        v
    }

    fn write_version(&mut self, leaf: &Cert) -> String {
        self.generation += 1;
        let t = time::OffsetDateTime::now_utc();
        let name = format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            self.generation
        );
        let version = self.dir.join(&name);
        fs::create_dir(&version).expect("version dir");
        fs::write(version.join("tls.crt"), &leaf.pem).expect("tls.crt");
        fs::write(version.join("tls.key"), &leaf.key_pem).expect("tls.key");
        name
    }

    /// Kubelet's update: a new version directory, `..data_tmp` pointing at it renamed
    /// over `..data` (the one atomic step), then the old version removed.
    fn update(&mut self, leaf: &Cert) {
        let old = self.current.clone();
        self.current = self.write_version(leaf);
        let tmp = self.dir.join("..data_tmp");
        symlink(&self.current, &tmp).expect("..data_tmp");
        fs::rename(&tmp, self.dir.join("..data")).expect("swapping ..data");
        fs::remove_dir_all(self.dir.join(old)).expect("removing the old version");
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

/// What follows a renewal on disk for a proxy that does not reload by itself: the
/// daemon calls it stale (certificate and key), then expired in memory once the old
/// certificate passes not_after, while it still serves the old one; after a reload it is
/// fresh again. Returns what the daemon says of it then.
fn stale_then_expired_until_reload(
    daemon: &Daemon,
    scenario: &str,
    nginx: &Nginx,
    port: u16,
    cert: &Path,
    key: &Path,
    old: &Cert,
) -> Value {
    let pid = nginx.pid();
    let since = Instant::now();
    let p = noticed(
        daemon,
        scenario,
        "stale",
        pid,
        since,
        files_are(&[cert, key], "stale"),
    );
    let c = file(&p, path_str(cert));
    assert_eq!(c["kind"], "identity", "{}", pretty(&p));
    assert_eq!(c["verdict"], "stale", "{}", pretty(&p));
    assert_eq!(c["current_version"]["sha256"], sha256_of(cert));
    assert_eq!(
        file(&p, path_str(key))["verdict"],
        "stale",
        "{}",
        pretty(&p)
    );
    assert_eq!(served(port).as_deref(), Some(old.sha256.as_str()));

    // Whatever replaced it on disk, what the proxy holds is only in its memory now.
    let expired_at = until_expired(old);
    let p = noticed(
        daemon,
        scenario,
        "expired_in_memory",
        pid,
        expired_at,
        verdict_is("expired_in_memory"),
    );
    assert_expired_in_memory(&p, cert, key, old);
    // The incident itself: clients are handed the expired certificate.
    assert_eq!(served(port).as_deref(), Some(old.sha256.as_str()));

    let since = Instant::now();
    nginx.reload();
    noticed(
        daemon,
        scenario,
        "fresh after reload",
        pid,
        since,
        verdict_is("fresh"),
    )
}

#[test]
fn a_proxy_keeps_serving_a_certificate_renewed_by_atomic_rename_until_it_reloads() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("nginx", "nginx-light");
    require("openssl", "openssl");
    let scenario = "proxy-expired-certificate/atomic-rename";
    let dir = TempDir::new("proxy-rename");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = Cert::ca("Proxy Issuing CA");
    let old = ca.leaf(SERVER_NAME, SHORT_LIVED);
    fs::write(&cert, &old.pem).unwrap();
    fs::write(&key, &old.key_pem).unwrap();
    let port = free_port();
    let nginx = Nginx::start(dir.path(), port, &cert, &key);
    let pid = nginx.pid();
    wait_served(port, &old, "the first certificate");
    let p = daemon.wait_for("fresh", pid, verdict_is("fresh"));
    assert_fresh(&p);
    assert_eq!(
        file(&p, path_str(&cert))["kind"],
        "identity",
        "{}",
        pretty(&p)
    );

    // cert-manager renews: key first, then the certificate, each renamed into place.
    let renewed = ca.leaf(SERVER_NAME, RENEWED);
    replace_atomically(&key, &renewed.key_pem);
    replace_atomically(&cert, &renewed.pem);
    let p = stale_then_expired_until_reload(&daemon, scenario, &nginx, port, &cert, &key, &old);
    assert_fresh(&p);
    wait_served(port, &renewed, "the renewed certificate after the reload");
}

#[test]
fn a_proxy_keeps_serving_a_certificate_renewed_by_a_secret_volume_data_swap_until_it_reloads() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("nginx", "nginx-light");
    require("openssl", "openssl");
    let scenario = "proxy-expired-certificate/data-swap";
    let dir = TempDir::new("proxy-volume");
    let ca = Cert::ca("Proxy Issuing CA");
    let old = ca.leaf(SERVER_NAME, SHORT_LIVED);
    let mut volume = SecretVolume::new(&dir.join("secret"), &old);
    let (cert, key) = (volume.cert(), volume.key());
    let first_version = volume.dir.join(&volume.current);
    let port = free_port();
    let nginx = Nginx::start(dir.path(), port, &cert, &key);
    let pid = nginx.pid();
    wait_served(port, &old, "the first certificate");
    let p = daemon.wait_for("fresh", pid, verdict_is("fresh"));
    assert_fresh(&p);
    // The path as nginx named it, and where the links led when it read it.
    assert_eq!(
        file(&p, path_str(&cert))["resolved"],
        path_str(&first_version.join("tls.crt")),
        "{}",
        pretty(&p)
    );

    let renewed = ca.leaf(SERVER_NAME, RENEWED);
    volume.update(&renewed);
    let p = stale_then_expired_until_reload(&daemon, scenario, &nginx, port, &cert, &key, &old);
    assert_fresh(&p);
    // Where the links led when it re-read them: the renewed version's directory.
    assert_eq!(
        file(&p, path_str(&cert))["resolved"],
        path_str(&volume.dir.join(&volume.current).join("tls.crt")),
        "{}",
        pretty(&p)
    );
    wait_served(port, &renewed, "the renewed certificate after the reload");
}

#[test]
fn a_server_that_cannot_reload_serves_its_expired_certificate_until_it_is_restarted() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("openssl", "openssl");
    let scenario = "proxy-expired-certificate/restart";
    let dir = TempDir::new("proxy-restart");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = Cert::ca("Proxy Issuing CA");
    let old = ca.leaf(SERVER_NAME, SHORT_LIVED);
    fs::write(&cert, &old.pem).unwrap();
    fs::write(&key, &old.key_pem).unwrap();
    let port = free_port();
    let server = s_server(port, &cert, &key);
    let old_pid = server.pid();
    wait_served(port, &old, "the first certificate");
    let p = daemon.wait_for("fresh", old_pid, verdict_is("fresh"));
    assert_fresh(&p);

    let renewed = ca.leaf(SERVER_NAME, RENEWED);
    replace_atomically(&key, &renewed.key_pem);
    replace_atomically(&cert, &renewed.pem);
    let since = Instant::now();
    let p = noticed(
        &daemon,
        scenario,
        "stale",
        old_pid,
        since,
        files_are(&[&cert, &key], "stale"),
    );
    assert_eq!(
        file(&p, path_str(&cert))["kind"],
        "identity",
        "{}",
        pretty(&p)
    );
    assert_eq!(served(port).as_deref(), Some(old.sha256.as_str()));

    let expired_at = until_expired(&old);
    let p = noticed(
        &daemon,
        scenario,
        "expired_in_memory",
        old_pid,
        expired_at,
        verdict_is("expired_in_memory"),
    );
    assert_expired_in_memory(&p, &cert, &key, &old);
    assert_eq!(served(port).as_deref(), Some(old.sha256.as_str()));

    // The only remedy: a new process on the same port.
    let since = Instant::now();
    drop(server);
    let server = s_server(port, &cert, &key);
    let p = noticed(
        &daemon,
        scenario,
        "fresh after restart",
        server.pid(),
        since,
        verdict_is("fresh"),
    );
    assert_fresh(&p);
    wait_served(port, &renewed, "the renewed certificate after the restart");
    let gone = daemon.wait_for("listed as exited", old_pid, |p| p["exited_at"].is_string());
    assert!(
        gone["files"].as_array().is_some_and(|f| !f.is_empty()),
        "an exited process keeps what it read: {}",
        pretty(&gone)
    );
    // Who needs a restart now: the exited server is no longer among them.
    let (status, needing) = daemon.get("/processes?verdict=expired_in_memory&exited=false");
    assert_eq!(status, 200, "{needing}");
    assert!(
        !needing
            .as_array()
            .is_some_and(|l| l.iter().any(|p| p["pid"] == old_pid)),
        "{needing}"
    );
}
