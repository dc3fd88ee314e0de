//! Facts about live processes from /proc, always checked against the process start time
//! the probe recorded: a pid alone names whoever holds it now, not whoever read the file.
//!
//! This is the one place that reads files under `/proc/<pid>/`, and it reads only what the
//! kernel generates (stat, status, cgroup, maps, cmdline, links), each bounded in size.
//! Nothing here follows a process's links into its files: that is `rootfs`'s job.

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// At most `cap` bytes of `/proc/<pid>/<name>` as text: generated files, but some
/// (maps, cmdline) grow with what the process does.
fn read_capped(pid: u32, name: &str, cap: u64) -> io::Result<String> {
    let mut text = String::new();
    fs::File::open(format!("/proc/{pid}/{name}"))?
        .take(cap)
        .read_to_string(&mut text)
        .or_else(|e| {
            // A cut in the middle of a UTF-8 sequence (a path in maps): keep what is whole.
            if e.kind() == io::ErrorKind::InvalidData {
                Ok(0)
            } else {
                Err(e)
            }
        })?;
    Ok(text)
}

/// Every pid in /proc.
pub fn pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The process's memory map (`/proc/<pid>/maps`), up to 8 MiB (about 80,000 mappings).
pub fn maps(pid: u32) -> Option<String> {
    read_capped(pid, "maps", 8 << 20).ok()
}

/// The process's name (`/proc/<pid>/comm`).
pub fn comm(pid: u32) -> Option<String> {
    read_capped(pid, "comm", 64)
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// The real uid (`Uid:` in `/proc/<pid>/status`).
pub fn uid(pid: u32) -> Option<u32> {
    read_capped(pid, "status", 64 << 10)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Where its executable is, as the kernel names it (text only; nothing is opened).
pub fn exe_path(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Where its root is, as the kernel names it from the daemon's side (text only; nothing
/// is opened).
pub fn root_path(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/root")).ok()
}

/// The process's open fds.
pub fn fds(pid: u32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// (dev, ino) of the file the process's `fd` is open on (`stat` through the link, which
/// gives the open file itself, whatever its path now leads to).
pub fn fd_identity(pid: u32, fd: i32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// `sysconf(_SC_CLK_TCK)`: the unit of the start time in /proc/<pid>/stat.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as u64 } else { 100 }
    })
}

/// Converts a `CLOCK_BOOTTIME` start in ns to /proc's clock ticks, as the kernel does.
pub fn start_ns_to_ticks(start_ns: u64) -> u64 {
    start_ns / (1_000_000_000 / clock_ticks_per_second())
}

/// Field 22 of /proc/<pid>/stat: start time since boot, in clock ticks.
pub fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = read_capped(pid, "stat", 4096)?;
    parse_start_ticks(&stat).ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // comm may contain spaces and parentheses: the fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After comm: state is field 3, so starttime (22) is the 20th here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start_ns` (0 = unknown start,
/// accepted: the caller learned the pid moments ago).
pub fn is_same_process(pid: u32, start_ns: u64) -> bool {
    match start_ticks(pid) {
        Ok(ticks) => start_ns == 0 || ticks == start_ns_to_ticks(start_ns),
        Err(_) => false,
    }
}

/// The daemon's own resource use, for the conventional `process_*` metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OwnUsage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_ticks: u64,
}

pub fn own_usage() -> Option<OwnUsage> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // Fields after comm, from state (3): utime 14, stime 15, starttime 22, vsize 23,
    // rss 24 (pages).
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    let ticks = clock_ticks_per_second() as f64;
    // SAFETY: sysconf has no preconditions.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let max_fds = fs::read_to_string("/proc/self/limits").ok().and_then(|l| {
        l.lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    });
    Some(OwnUsage {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        open_fds: fs::read_dir("/proc/self/fd").ok()?.count() as u64,
        max_fds: max_fds.unwrap_or(0),
        start_ticks: field(22)?,
    })
}

/// The process's cgroup v2 path (the `0::` line), if it has one.
pub fn cgroup_path(pid: u32) -> Option<String> {
    let text = read_capped(pid, "cgroup", 64 << 10).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Inode number of the mount namespace of `pid` (`/proc/<pid>/ns/mnt` -> `mnt:[N]`).
pub fn mount_namespace_of(pid: u32) -> Option<u32> {
    let link = fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    link.to_str()?
        .strip_prefix("mnt:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The host's mount namespace: init's (see `Root::host`), else the daemon's own.
pub fn host_mount_namespace() -> Option<u32> {
    static HOST: OnceLock<Option<u32>> = OnceLock::new();
    *HOST.get_or_init(|| mount_namespace_of(1).or_else(own_mount_namespace))
}

/// The daemon's own mount namespace.
pub fn own_mount_namespace() -> Option<u32> {
    static OWN: OnceLock<Option<u32>> = OnceLock::new();
    *OWN.get_or_init(|| mount_namespace_of(std::process::id()))
}

/// The command line, arguments joined by spaces, cut at 256 bytes (it can hold secrets
/// and be huge; enough to tell processes apart).
pub fn cmdline(pid: u32) -> Option<String> {
    let mut raw = Vec::new();
    fs::File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .take(4096)
        .read_to_end(&mut raw)
        .ok()?;
    if raw.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&raw)
        .trim_end_matches('\0')
        .replace('\0', " ");
    Some(truncate(&text, 256))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Where a relative path of the process starts: its cwd, or what `dirfd` refers to,
/// expressed inside its root.
pub fn base_dir(pid: u32, dirfd: i32) -> io::Result<PathBuf> {
    let link = if dirfd == libc::AT_FDCWD {
        fs::read_link(format!("/proc/{pid}/cwd"))?
    } else {
        fs::read_link(format!("/proc/{pid}/fd/{dirfd}"))?
    };
    // For a chroot in our mount namespace the link is a host path under the chroot;
    // for another mount namespace the kernel already prints it relative to that root.
    let root = fs::read_link(format!("/proc/{pid}/root")).unwrap_or_else(|_| "/".into());
    Ok(strip_root(&link, &root))
}

/// `link` (a path as the daemon sees it) inside `root` (the process's root, as the daemon
/// sees it).
pub fn strip_root(link: &Path, root: &Path) -> PathBuf {
    if root == Path::new("/") {
        return link.to_path_buf();
    }
    match link.strip_prefix(root) {
        Ok(inside) => Path::new("/").join(inside),
        Err(_) => link.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_comms() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn our_own_start_time_matches_itself() {
        let me = std::process::id();
        let ticks = start_ticks(me).unwrap();
        let ns = ticks * (1_000_000_000 / clock_ticks_per_second());
        assert!(is_same_process(me, ns));
        assert!(!is_same_process(me, ns + 10_000_000_000));
    }

    #[test]
    fn our_own_usage_is_read_from_proc() {
        let u = own_usage().unwrap();
        assert_eq!(u.start_ticks, start_ticks(std::process::id()).unwrap());
        assert!(u.resident_bytes > 1 << 20 && u.virtual_bytes >= u.resident_bytes);
        assert!(u.open_fds >= 3 && u.max_fds >= u.open_fds);
        assert!(u.cpu_seconds >= 0.0);
    }

    #[test]
    fn long_command_lines_are_cut_at_a_char_boundary() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééééé", 3), "é…");
        assert!(cmdline(std::process::id()).is_some());
    }

    #[test]
    fn chroot_links_are_expressed_inside_the_root() {
        assert_eq!(
            strip_root(Path::new("/srv/jail/etc/ssl"), Path::new("/srv/jail")),
            Path::new("/etc/ssl")
        );
        assert_eq!(
            strip_root(Path::new("/etc/ssl"), Path::new("/")),
            Path::new("/etc/ssl")
        );
    }
}
