//! What the probe needs from the process before it touches BPF: the right capabilities,
//! and no memlock limit on kernels that still charge BPF maps to it.

use std::fs;

use anyhow::{Result, bail};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Fails with what to do when this process cannot load and attach the probe.
pub fn check() -> Result<()> {
    let caps = effective_caps().unwrap_or(0);
    let can_bpf = has(caps, CAP_SYS_ADMIN) || (has(caps, CAP_BPF) && has(caps, CAP_PERFMON));
    if !can_bpf {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        bail!(
            "trustdrift needs to load an eBPF probe: run it as root, or grant CAP_BPF and \
             CAP_PERFMON (plus CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH to read other \
             processes' files); this process runs as uid {euid} with effective capabilities \
             {caps:#x}"
        );
    }
    Ok(())
}

/// Lifts RLIMIT_MEMLOCK for kernels before 5.11, which charge BPF maps to it.
pub fn lift_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct for the current process.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
