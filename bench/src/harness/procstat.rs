//! A process's CPU time and memory, from /proc.

use std::{fs, time::Instant};

use anyhow::{Context, Result};

/// Clock ticks per second, the unit of utime and stime in /proc/PID/stat.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces and parens):
/// index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (_, rest) = text
        .rsplit_once(')')
        .with_context(|| format!("{path}: no command name"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of every thread of `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let f = stat_fields(pid)?;
    let field = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat: field {} unreadable", i + 3))
    };
    // utime and stime are fields 14 and 15.
    Ok((field(11)? + field(12)?) as f64 / clock_ticks())
}

/// Resident and peak resident memory; of the resident, anonymous (heap, stacks) and
/// file-backed (the binary's pages).
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl Memory {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }

    pub fn anon_mib(&self) -> f64 {
        self.anon_kib as f64 / 1024.0
    }

    pub fn file_mib(&self) -> f64 {
        self.file_kib as f64 / 1024.0
    }
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |key: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{path}: no {key}"))
    };
    Ok(Memory {
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
        anon_kib: kib("RssAnon:")?,
        file_kib: kib("RssFile:")?,
    })
}

/// CPU used by a process over an interval, as a share of one core.
pub struct CpuMeter {
    pid: u32,
    seconds: f64,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Result<Self> {
        Ok(Self {
            pid,
            seconds: cpu_seconds(pid)?,
            at: Instant::now(),
        })
    }

    /// (CPU seconds used, wall seconds elapsed) since the start.
    pub fn read(&self) -> Result<(f64, f64)> {
        let used = cpu_seconds(self.pid)? - self.seconds;
        Ok((used, self.at.elapsed().as_secs_f64()))
    }

    /// CPU seconds per wall second since the start (1.0 = one core busy).
    pub fn share(&self) -> Result<f64> {
        let (used, wall) = self.read()?;
        Ok(if wall > 0.0 { used / wall } else { 0.0 })
    }
}
