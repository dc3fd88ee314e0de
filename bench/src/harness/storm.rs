//! A storm of short-lived processes, each opening and reading a few trust files once,
//! then exiting: every one of its opens is a new (process, path) pair, so each one is a
//! record the probe must deliver. Drivers forked from this process fork the storm, paced
//! or as fast as they can; a storm process is a plain fork (no exec), the cheapest
//! process a machine can make, so the storm is as fast as process creation allows.

use std::{
    ffi::{CString, c_char},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::harness::fleet::child_setup;

pub struct Plan<'a> {
    /// What each storm process opens and reads (4 KiB of each).
    pub paths: &'a [CString],
    /// Forking processes; the storm's rate is split between them.
    pub drivers: usize,
    /// Storm processes per second over all drivers; `None`: as fast as they can.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// At most this many storm processes in all.
    pub max_processes: u64,
}

/// What the drivers did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub processes: u64,
    pub fork_failures: u64,
    /// From the first driver's start to the last storm process reaped.
    pub elapsed: Duration,
    /// CPU of the drivers and of every storm process (user + system).
    pub cpu_seconds: f64,
}

impl Outcome {
    pub fn processes_per_second(&self) -> f64 {
        self.processes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// processes, fork failures, start ns, end ns, CPU ns.
const RECORD: usize = 40;

struct Driver {
    pid: libc::pid_t,
    report: OwnedFd,
    reaped: bool,
}

/// A storm under way; dropping it kills the drivers (their storm processes die with them
/// or within microseconds).
pub struct Storm {
    drivers: Vec<Driver>,
}

fn now_ns() -> u64 {
    let mut ts: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Storm {
    pub fn start(plan: &Plan) -> Result<Self> {
        if plan.drivers == 0 || plan.paths.is_empty() {
            bail!("a storm needs at least one driver and one path");
        }
        let ptrs: Vec<*const c_char> = plan.paths.iter().map(|p| p.as_ptr()).collect();
        let n = plan.drivers as u64;
        let per_driver_max = plan.max_processes.div_ceil(n);
        let interval_ns = plan
            .rate
            .filter(|r| *r > 0.0)
            .map_or(0, |r| (1e9 * n as f64 / r) as u64);
        let duration_ns = plan.duration.as_nanos() as u64;
        let mut storm = Storm {
            drivers: Vec::new(),
        };
        for index in 0..n {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two fds into the array.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                bail!(
                    "creating a driver's pipe: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: both fds were just created and are owned by nobody else.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: fork in a single-threaded process; the child runs only
            // async-signal-safe calls and never returns.
            let pid = unsafe {
                let parent = libc::getpid();
                let pid = libc::fork();
                if pid == 0 {
                    driver(
                        &ptrs,
                        w.as_raw_fd(),
                        parent,
                        DriverPlan {
                            // Drivers take turns within each interval.
                            offset_ns: interval_ns * index / n,
                            interval_ns,
                            duration_ns,
                            max: per_driver_max,
                        },
                    );
                }
                pid
            };
            if pid < 0 {
                bail!(
                    "forking a storm driver: {}",
                    std::io::Error::last_os_error()
                );
            }
            storm.drivers.push(Driver {
                pid,
                report: r,
                reaped: false,
            });
        }
        Ok(storm)
    }

    /// True once every driver has finished.
    pub fn is_done(&mut self) -> bool {
        for d in &mut self.drivers {
            // SAFETY: waiting for a child of ours, without blocking.
            if !d.reaped
                && unsafe { libc::waitpid(d.pid, std::ptr::null_mut(), libc::WNOHANG) } == d.pid
            {
                d.reaped = true;
            }
        }
        self.drivers.iter().all(|d| d.reaped)
    }

    /// Waits for every driver; what they did.
    pub fn finish(mut self) -> Result<Outcome> {
        let mut total = Outcome::default();
        let (mut first, mut last) = (u64::MAX, 0u64);
        for d in &mut self.drivers {
            let mut rec = [0u8; RECORD];
            let mut got = 0;
            while got < RECORD {
                crate::harness::check_interrupt()?;
                // SAFETY: reading into a buffer we own, within its length.
                let n = unsafe {
                    libc::read(
                        d.report.as_raw_fd(),
                        rec[got..].as_mut_ptr().cast(),
                        RECORD - got,
                    )
                };
                if n == 0 {
                    bail!("storm driver {} exited without reporting", d.pid);
                }
                if n < 0 {
                    if crate::harness::errno() == libc::EINTR {
                        continue;
                    }
                    return Err(std::io::Error::last_os_error())
                        .context("reading a driver's report");
                }
                got += n as usize;
            }
            if !d.reaped {
                // SAFETY: waiting for a child of ours, which has reported and is exiting.
                unsafe { libc::waitpid(d.pid, std::ptr::null_mut(), 0) };
                d.reaped = true;
            }
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rec[i * 8..i * 8 + 8]);
                u64::from_ne_bytes(b)
            };
            total.processes += word(0);
            total.fork_failures += word(1);
            first = first.min(word(2));
            last = last.max(word(3));
            total.cpu_seconds += word(4) as f64 / 1e9;
        }
        total.elapsed = Duration::from_nanos(last.saturating_sub(first));
        Ok(total)
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        for d in self.drivers.iter().filter(|d| !d.reaped) {
            // SAFETY: children of ours, not yet reaped.
            unsafe {
                libc::kill(d.pid, libc::SIGKILL);
                libc::waitpid(d.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

struct DriverPlan {
    offset_ns: u64,
    /// 0: no pacing.
    interval_ns: u64,
    duration_ns: u64,
    max: u64,
}

fn child_errno() -> i32 {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

fn cpu_ns(who: i32) -> u64 {
    // SAFETY: getrusage writes into a struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}

/// A driver's whole life: fork storm processes on schedule, reap them, report.
///
/// # Safety
/// Only in a forked child; `paths` point to NUL-terminated strings.
unsafe fn driver(paths: &[*const c_char], report: i32, parent: libc::pid_t, plan: DriverPlan) -> ! {
    // SAFETY: in a forked child, async-signal-safe calls only, on memory it owns.
    unsafe {
        child_setup(c"td-storm", report, parent);
        let start = now_ns();
        let deadline = start + plan.duration_ns;
        let (mut forked, mut failures, mut live, mut k) = (0u64, 0u64, 0u64, 0u64);
        loop {
            let now = now_ns();
            if now >= deadline || forked >= plan.max {
                break;
            }
            if plan.interval_ns > 0 {
                let due = start + plan.offset_ns + k * plan.interval_ns;
                if due >= deadline {
                    break;
                }
                if due > now {
                    let ts = libc::timespec {
                        tv_sec: (due / 1_000_000_000) as libc::time_t,
                        tv_nsec: (due % 1_000_000_000) as libc::c_long,
                    };
                    libc::clock_nanosleep(
                        libc::CLOCK_MONOTONIC,
                        libc::TIMER_ABSTIME,
                        &ts,
                        std::ptr::null_mut(),
                    );
                }
            }
            k += 1;
            match libc::fork() {
                0 => storm_process(paths),
                pid if pid > 0 => {
                    forked += 1;
                    live += 1;
                }
                _ => {
                    // Out of processes: wait for one before trying again.
                    failures += 1;
                    if libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {
                        live -= 1;
                    }
                }
            }
            while live > 0 && libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {
                live -= 1;
            }
        }
        while live > 0 {
            if libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 {
                live -= 1;
            } else if child_errno() != libc::EINTR {
                break;
            }
        }
        let end = now_ns();
        let cpu = cpu_ns(libc::RUSAGE_SELF) + cpu_ns(libc::RUSAGE_CHILDREN);
        let mut rec = [0u8; RECORD];
        for (i, v) in [forked, failures, start, end, cpu].iter().enumerate() {
            rec[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        libc::write(3, rec.as_ptr().cast(), RECORD);
        libc::_exit(0);
    }
}

/// A storm process: open, read and close each path once, exit.
///
/// # Safety
/// Only in a forked child; `paths` point to NUL-terminated strings.
unsafe fn storm_process(paths: &[*const c_char]) -> ! {
    // SAFETY: plain syscalls on a buffer we own.
    unsafe {
        let mut buf = [0u8; 4096];
        for path in paths {
            let fd = libc::open(*path, libc::O_RDONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                libc::close(fd);
            }
        }
        libc::_exit(0)
    }
}
