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

/// Capabilities kept once the probe is attached: what reading other processes' files
/// needs (their `/proc/<pid>/` links and roots, and files whatever their modes).
const KEEP: &[(u32, &str)] = &[(2, "CAP_DAC_READ_SEARCH"), (19, "CAP_SYS_PTRACE")];

/// Before Linux 6.5 every `bpf()` call, a map lookup on an fd the daemon already holds
/// included, needs CAP_BPF when unprivileged BPF is disabled (the distributions' default).
const KEEP_BEFORE_6_5: &[(u32, &str)] = &[(CAP_BPF, "CAP_BPF")];

/// The running kernel's (major, minor).
fn kernel_version() -> Option<(u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops, for the calling thread and every thread it starts from now on, every capability
/// the daemon no longer needs once its probe is attached, and sets `no_new_privs`. Call
/// it before starting any other thread: capabilities are per thread. Returns the names of
/// the capabilities kept, for the log.
pub fn drop_after_attach() -> Result<Vec<&'static str>> {
    let mut keep: Vec<(u32, &'static str)> = KEEP.to_vec();
    if kernel_version().is_none_or(|v| v < (6, 5)) {
        keep.extend_from_slice(KEEP_BEFORE_6_5);
    }
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // The bounding set first, while CAP_SETPCAP may still be there: nothing exec'd later
    // could regain what is dropped (a daemon that lacks CAP_SETPCAP keeps its bounding
    // set; no_new_privs below still holds).
    for cap in 0..=last {
        if !keep.iter().any(|(k, _)| *k == cap) {
            // SAFETY: prctl with plain integer arguments.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut current = [CapData::default(); 2];
    // SAFETY: a v3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, current.as_mut_ptr()) } != 0 {
        bail!("reading capabilities: {}", std::io::Error::last_os_error());
    }
    let mut wanted = [CapData::default(); 2];
    let mut kept = Vec::new();
    for (cap, name) in &keep {
        let (word, bit) = ((*cap / 32) as usize, 1u32 << (cap % 32));
        if current[word].permitted & bit != 0 {
            wanted[word].permitted |= bit;
            wanted[word].effective |= bit;
            kept.push(*name);
        }
    }
    // SAFETY: a v3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header, wanted.as_ptr()) } != 0 {
        bail!("dropping capabilities: {}", std::io::Error::last_os_error());
    }
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("setting no_new_privs: {}", std::io::Error::last_os_error());
    }
    Ok(kept)
}
