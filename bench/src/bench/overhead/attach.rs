//! What each variant of the overhead benchmark attaches, and how it is taken off again:
//! trustdrift (or the empty floor programs of its hooks), a bpftrace script with its
//! prefix filter, auditd read watches on the same prefixes.

use super::*;

/// Something attached to the kernel while a measurement runs.
#[derive(Clone, Debug)]
pub(super) enum Variant {
    Baseline,
    Trustdrift {
        floor: bool,
        lean: bool,
    },
    /// The floor plus the path copy of every read-only open (kernel accounting only).
    CopyFloor {
        lean: bool,
    },
    Bpftrace,
    Auditd,
}

impl Variant {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Variant::Baseline => "baseline (nothing attached)",
            Variant::Trustdrift {
                floor: true,
                lean: false,
            } => "floor: empty tp_btf sys_exit",
            Variant::Trustdrift {
                floor: false,
                lean: false,
            } => "trustdrift full (opens+reads), default",
            Variant::Trustdrift {
                floor: true,
                lean: true,
            } => "floor: empty open-entry tracepoints",
            Variant::Trustdrift {
                floor: false,
                lean: true,
            } => "trustdrift lean (opens only)",
            Variant::CopyFloor { lean: false } => "copy floor: tp_btf sys_exit copying paths",
            Variant::CopyFloor { lean: true } => "copy floor: open-entry tracepoints copying paths",
            Variant::Bpftrace => "bpftrace opens-only script, same prefixes",
            Variant::Auditd => "auditd read watches, same prefixes",
        }
    }
}

/// trustdrift's default trust prefixes, read from the daemon's source so this benchmark
/// never watches something else than trustdrift does.
pub(super) fn default_prefixes() -> Vec<String> {
    const SOURCE: &str = include_str!("../../../../daemon/src/probe/trust_paths.rs");
    let start = SOURCE
        .find("DEFAULT_PREFIXES: &[&str] = &[")
        .expect("DEFAULT_PREFIXES in trust_paths.rs");
    let list = &SOURCE[start..];
    let list = &list[..list.find("];").expect("the end of DEFAULT_PREFIXES")];
    list.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('"'))
        .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
        .collect()
}

/// The script a user would write: the open syscalls, the path read once per block,
/// compared with each prefix (bpftrace 0.17 has no suffix match, so only the prefixes).
/// Its verifier budget fits about 8 `strncmp`s per program, so, as a user must, the
/// prefixes are split over blocks of 6 on the same tracepoints.
pub(super) fn bpftrace_script(prefixes: &[String]) -> String {
    prefixes
        .chunks(6)
        .map(|chunk| {
            let tests: Vec<String> = chunk
                .iter()
                .map(|p| format!("strncmp($p, \"{p}\", {}) == 0", p.len()))
                .collect();
            format!(
                "tracepoint:syscalls:sys_enter_openat, tracepoint:syscalls:sys_enter_openat2, \
                 tracepoint:syscalls:sys_enter_open {{ $p = str(args->filename); if ({}) {{ \
                 @[comm, $p] = count(); }} }}",
                tests.join(" || ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) const AUDIT_KEY: &str = "trustdrift-bench";

/// auditd as the benchmark left it to find: the daemon it started (if any) and whether
/// auditing was enabled.
pub(super) struct AuditSession {
    started: Option<Child>,
    was_enabled: String,
}

pub(super) fn auditctl(args: &[&str]) -> Result<String> {
    let out = Command::new("auditctl")
        .args(args)
        .output()
        .context("running auditctl")?;
    if !out.status.success() {
        bail!(
            "auditctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn audit_status(field: &str) -> Result<String> {
    let status = auditctl(&["-s"])?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(' ').map(str::to_owned))
        .with_context(|| format!("no {field} in auditctl -s"))
}

pub(super) fn audit_attach(prefixes: &[String]) -> Result<AuditSession> {
    let was_enabled = audit_status("enabled")?;
    let started = if audit_status("pid")? == "0" {
        fs::create_dir_all("/var/log/audit").context("creating /var/log/audit")?;
        let child = Command::new("auditd")
            .arg("-n")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting auditd")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while audit_status("pid")? == "0" {
            if Instant::now() > deadline {
                bail!("auditd did not register with the kernel");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(child)
    } else {
        None
    };
    let mut session = AuditSession {
        started,
        was_enabled,
    };
    let setup = (|| -> Result<()> {
        auditctl(&["-e", "1"])?;
        for p in prefixes {
            let dir = p.trim_end_matches('/');
            if Path::new(dir).exists() {
                auditctl(&["-w", dir, "-p", "r", "-k", AUDIT_KEY])?;
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        audit_detach(&mut session);
        return Err(e);
    }
    Ok(session)
}

/// Removes the benchmark's watches only, restores the enabled flag, stops the auditd it
/// started.
pub(super) fn audit_detach(session: &mut AuditSession) {
    let _ = auditctl(&["-D", "-k", AUDIT_KEY]);
    let _ = auditctl(&["-e", &session.was_enabled]);
    if let Some(mut child) = session.started.take() {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
}

pub(super) enum Attached {
    Program {
        child: Child,
        stdout: BufReader<ChildStdout>,
    },
    Audit(AuditSession),
}

pub(super) fn wait_for_line(stdout: &mut BufReader<ChildStdout>, what: &str) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            bail!("{what} exited before attaching");
        }
        if line.contains("attached") || line.starts_with("Attaching") {
            return Ok(());
        }
    }
}

pub(super) struct Setup<'a> {
    pub(super) trustdrift: &'a Path,
    pub(super) prefixes: &'a [String],
}

pub(super) fn attach(
    variant: &Variant,
    setup: &Setup<'_>,
    stats: bool,
) -> Result<Option<Attached>> {
    let mut cmd = match variant {
        Variant::Baseline => return Ok(None),
        Variant::Auditd => {
            let session = audit_attach(setup.prefixes)?;
            std::thread::sleep(Duration::from_millis(200));
            return Ok(Some(Attached::Audit(session)));
        }
        Variant::Trustdrift { lean, .. } | Variant::CopyFloor { lean } => {
            let mut c = Command::new(setup.trustdrift);
            c.args(["--log", "warn", "attach"]);
            match variant {
                Variant::CopyFloor { .. } => {
                    c.arg("--copy-floor");
                }
                Variant::Trustdrift { floor: true, .. } => {
                    c.arg("--floor");
                }
                _ => {}
            }
            if *lean {
                c.args(["--mode", "lean"]);
            }
            if stats {
                c.arg("--stats");
            }
            c
        }
        Variant::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.args(["-e", &bpftrace_script(setup.prefixes)]);
            c
        }
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", variant.name()))?;
    let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
    wait_for_line(&mut stdout, variant.name())?;
    // Let the attach settle (bpftrace prints before the last probe is live, and before
    // the verifier may still refuse a program).
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait()? {
        bail!("{} exited ({status}) instead of attaching", variant.name());
    }
    Ok(Some(Attached::Program { child, stdout }))
}

/// Stops an attached variant; returns what it printed after the signal.
pub(super) fn detach(attached: Option<Attached>) -> Result<String> {
    match attached {
        None => Ok(String::new()),
        Some(Attached::Audit(mut session)) => {
            audit_detach(&mut session);
            Ok(String::new())
        }
        Some(Attached::Program {
            mut child,
            mut stdout,
        }) => {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
            child.wait()?;
            Ok(rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefixes_are_the_daemons_defaults() {
        let p = default_prefixes();
        assert!(p.len() >= 10, "{p:?}");
        assert!(p.contains(&"/etc/ssl/".to_owned()));
        assert!(p.iter().all(|p| p.starts_with('/') && p.ends_with('/')));
    }

    #[test]
    fn the_bpftrace_script_tests_every_prefix_in_blocks_the_verifier_accepts() {
        let prefixes: Vec<String> = (0..8).map(|i| format!("/p{i}/")).collect();
        let script = bpftrace_script(&prefixes);
        assert_eq!(script.matches("str(args->filename)").count(), 2);
        assert!(script.contains(r#"strncmp($p, "/p7/", 4) == 0"#));
    }
}
