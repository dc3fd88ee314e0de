//! A JVM builds its default SSLContext once, from its trust store, and keeps running while
//! the keystore changes under it (`keytool -importcert`, `keytool -delete`): trustdrift
//! must call it stale and name what differs, and a restarted JVM must be fresh. The JVM
//! itself is asked what it trusts, so the verdict is checked against the truth.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, Value};

use crate::support::{file, noticed, require, shas};

/// Builds the default SSLContext (which loads the default trust store) and keeps the
/// trust managers it made at the same moment: `check <sha256>` then answers from memory,
/// never from the file again.
const AGENT: &str = r#"
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.security.KeyStore;
import java.security.MessageDigest;
import java.security.cert.X509Certificate;
import java.util.HexFormat;
import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509TrustManager;

public class Agent {
    public static void main(String[] args) throws Exception {
        SSLContext.getDefault();
        TrustManagerFactory tmf =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init((KeyStore) null);
        X509TrustManager trust = null;
        for (TrustManager t : tmf.getTrustManagers()) {
            if (t instanceof X509TrustManager x) trust = x;
        }
        System.out.println("loaded");
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        for (String line; (line = in.readLine()) != null; ) {
            if (!line.startsWith("check ")) continue;
            String want = line.substring(6).trim();
            boolean found = false;
            for (X509Certificate c : trust.getAcceptedIssuers()) {
                byte[] sha = MessageDigest.getInstance("SHA-256").digest(c.getEncoded());
                found |= HexFormat.of().formatHex(sha).equals(want);
            }
            System.out.println(found ? "trusted" : "untrusted");
        }
    }
}
"#;

/// The store's password: the JDK default, which Debian's cacerts uses.
const STOREPASS: &str = "changeit";

/// A running `java Agent`; closing its stdin ends it.
struct Jvm {
    child: Guarded,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Jvm {
    /// Starts the agent with `store` as its default trust store; returns once it loaded.
    fn start(classes: &Path, store: &Path) -> Self {
        let mut child = Guarded::spawn(
            Command::new("java")
                .arg(format!("-Djavax.net.ssl.trustStore={}", store.display()))
                .arg(format!("-Djavax.net.ssl.trustStorePassword={STOREPASS}"))
                .arg("-cp")
                .arg(classes)
                .arg("Agent")
                // Options from the environment could point the JVM at another store.
                .env_remove("JAVA_TOOL_OPTIONS")
                .env_remove("JDK_JAVA_OPTIONS")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let stdin = child.0.stdin.take();
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let jvm = Self {
            child,
            stdin,
            lines,
        };
        assert_eq!(jvm.next_line(), "loaded");
        jvm
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("the JVM {} said nothing: {e}", self.pid()))
    }

    /// Whether the JVM's in-memory trust managers trust the certificate `sha256`.
    fn trusts(&mut self, sha256: &str) -> bool {
        let stdin = self.stdin.as_mut().expect("open stdin");
        writeln!(stdin, "check {sha256}").expect("asking the JVM");
        stdin.flush().expect("asking the JVM");
        match self.next_line().as_str() {
            "trusted" => true,
            "untrusted" => false,
            other => panic!("unexpected answer from the JVM: {other}"),
        }
    }

    /// Ends it as a service manager would stop it, and waits until it is gone.
    fn stop(mut self) {
        self.stdin = None;
        let status = self.child.wait(Duration::from_secs(20));
        assert!(status.success(), "the JVM exited with {status}");
    }
}

fn keytool(store: &Path, args: &[&str]) -> String {
    let out = Command::new("keytool")
        .args(args)
        .arg("-keystore")
        .arg(store)
        .args(["-storepass", STOREPASS])
        .output()
        .expect("keytool");
    assert!(
        out.status.success(),
        "keytool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every entry of the keystore with its SHA-256 fingerprint, as keytool lists them.
fn entries(store: &Path) -> Vec<(String, String)> {
    let list = keytool(store, &["-list"]);
    let mut entries = Vec::new();
    let mut alias = None;
    for line in list.lines() {
        if let Some(hex) = line.strip_prefix("Certificate fingerprint (SHA-256): ") {
            if let Some(a) = alias.take() {
                entries.push((a, hex.replace(':', "").to_lowercase()));
            }
        } else if line.contains("Entry, ") {
            alias = line.split(", ").next().map(str::to_owned);
        }
    }
    entries
}

fn pretty(p: &Value) -> String {
    serde_json::to_string_pretty(p).unwrap_or_default()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn a_jvm_keeps_the_trust_store_it_loaded_at_start_until_it_is_restarted() {
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    require("java", "default-jdk-headless");
    require("javac", "default-jdk-headless");
    require("keytool", "default-jdk-headless");
    let scenario = "java-keystore";
    let dir = TempDir::new("java");
    // A copy of the system's store, named as the JDK names its own: never the host's.
    let store = dir.join("cacerts");
    fs::copy("/etc/ssl/certs/java/cacerts", &store).expect("copying the system cacerts");
    let source = dir.join("Agent.java");
    fs::write(&source, AGENT).unwrap();
    let javac = Command::new("javac")
        .arg("-d")
        .arg(dir.path())
        .arg(&source)
        .output()
        .expect("javac");
    assert!(
        javac.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let before = entries(&store);
    assert!(before.len() > 1, "an empty system cacerts: {before:?}");
    // A root the distribution ships, removed later as a distrusted root would be; one
    // stored under a single alias, so that deleting the alias removes the certificate.
    let (distrusted_alias, distrusted) = before
        .iter()
        .find(|(_, sha)| before.iter().filter(|(_, s)| s == sha).count() == 1)
        .cloned()
        .unwrap_or_else(|| panic!("no certificate under a single alias: {before:?}"));

    let mut jvm = Jvm::start(dir.path(), &store);
    let pid = jvm.pid();
    // From "loaded": the JVM's start-up is not the daemon's latency.
    let since = Instant::now();
    let p = noticed(&daemon, scenario, "fresh", pid, since, |p| {
        p["verdict"] == "fresh"
    });
    let f = file(&p, path_str(&store));
    assert_eq!(f["kind"], "ca", "{}", pretty(&p));
    assert_eq!(f["read_version"]["format"], "jks", "{}", pretty(&p));
    assert_eq!(
        f["read_version"]["certificates"],
        before.len(),
        "every entry of the keystore is a certificate the daemon read: {}",
        pretty(&p)
    );
    assert_eq!(p["comm"], "java", "{}", pretty(&p));

    let added = Cert::ca("Corporate Proxy Root");
    let added_pem = dir.join("corporate-root.pem");
    fs::write(&added_pem, &added.pem).unwrap();
    keytool(
        &store,
        &[
            "-importcert",
            "-noprompt",
            "-alias",
            "corporate-proxy-root",
            "-file",
            path_str(&added_pem),
        ],
    );
    let since = Instant::now();
    // keytool rewrites the store in place: wait for the finished store, not a torn one.
    let p = noticed(&daemon, scenario, "stale (CA imported)", pid, since, |p| {
        p["verdict"] == "stale"
            && p["files"].as_array().is_some_and(|files| {
                files
                    .iter()
                    .any(|f| shas(&f["missing_cas"]) == [added.sha256.clone()])
            })
    });
    let f = file(&p, path_str(&store));
    assert_eq!(f["verdict"], "stale", "{}", pretty(&p));
    assert!(
        f["missing_cas"][0]["subject"]
            .as_str()
            .is_some_and(|s| s.contains("Corporate Proxy Root")),
        "{}",
        pretty(&p)
    );
    assert!(shas(&f["removed_cas_trusted"]).is_empty(), "{}", pretty(&p));
    assert_eq!(f["current_version"]["format"], "jks", "{}", pretty(&p));
    assert_eq!(
        f["current_version"]["certificates"],
        before.len() + 1,
        "{}",
        pretty(&p)
    );
    assert!(p["stale_since"].is_string(), "{}", pretty(&p));
    assert!(
        !jvm.trusts(&added.sha256),
        "the running JVM does not trust the imported root: the verdict is the truth"
    );

    keytool(&store, &["-delete", "-alias", &distrusted_alias]);
    let since = Instant::now();
    let p = noticed(
        &daemon,
        scenario,
        "removed CA still trusted",
        pid,
        since,
        |p| {
            p["files"].as_array().is_some_and(|files| {
                files
                    .iter()
                    .any(|f| shas(&f["removed_cas_trusted"]) == [distrusted.clone()])
            })
        },
    );
    let f = file(&p, path_str(&store));
    assert_eq!(p["verdict"], "stale", "{}", pretty(&p));
    assert_eq!(
        shas(&f["missing_cas"]),
        vec![added.sha256.clone()],
        "{}",
        pretty(&p)
    );
    assert!(
        jvm.trusts(&distrusted),
        "the running JVM still trusts the removed root ({distrusted_alias})"
    );

    // The remedy: a new JVM. The old one runs until the new one is up, as in a rollout.
    let mut restarted = Jvm::start(dir.path(), &store);
    let since = Instant::now();
    let p = noticed(
        &daemon,
        scenario,
        "fresh after restart",
        restarted.pid(),
        since,
        |p| p["verdict"] == "fresh",
    );
    let f = file(&p, path_str(&store));
    assert_eq!(
        f["read_version"]["sha256"],
        f["current_version"]["sha256"],
        "{}",
        pretty(&p)
    );
    assert!(shas(&f["missing_cas"]).is_empty(), "{}", pretty(&p));
    assert!(shas(&f["removed_cas_trusted"]).is_empty(), "{}", pretty(&p));
    assert!(restarted.trusts(&added.sha256));
    assert!(!restarted.trusts(&distrusted));
    let old = daemon.process(pid).expect("the old JVM is still listed");
    assert_eq!(old["verdict"], "stale", "{}", pretty(&old));
    assert!(old["exited_at"].is_null(), "{}", pretty(&old));

    jvm.stop();
    let since = Instant::now();
    let gone = noticed(&daemon, scenario, "exited", pid, since, |p| {
        p["exited_at"].is_string()
    });
    assert!(
        gone["files"].as_array().is_some_and(|f| !f.is_empty()),
        "an exited process keeps what it read: {}",
        pretty(&gone)
    );
    let still = daemon.process(restarted.pid()).expect("listed");
    assert_eq!(still["verdict"], "fresh", "{}", pretty(&still));
    assert!(still["exited_at"].is_null(), "{}", pretty(&still));
}
