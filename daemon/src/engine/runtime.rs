//! How the daemon uses the machine it runs on: its scheduling priority and its open-file
//! limit (its allocator is [`crate::allocator`]).

/// Raises the calling thread's scheduling priority by `boost` (threads it starts inherit
/// it). A storm of short-lived processes is many runnable tasks against the daemon's two
/// threads: at an equal share the daemon fell behind a full-speed storm on two CPUs, at
/// nice -5 it keeps up (docs/benchmarks.md). The daemon is idle otherwise, so the boost
/// costs nothing outside storms. Without CAP_SYS_NICE it stays as it is, with a warning.
pub fn raise_priority(boost: u32) {
    if boost == 0 {
        return;
    }
    let nice = -(boost.min(20) as i32);
    // SAFETY: setpriority only changes this thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            "cannot raise the daemon's priority to nice {nice} ({}): a storm of processes may \
             outrun it (set probe.priority_boost = 0 to silence this)",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for every
/// program: the daemon holds a handle on each container's root, its API connections and
/// its catalog's files at once, and a default soft limit of 1024 is a ceiling a busy node
/// reaches. The hard limit stays the administrator's.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write a valid rlimit for this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::debug!(
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
