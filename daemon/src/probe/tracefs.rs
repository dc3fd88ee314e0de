//! tracefs, where classic tracepoints live. A fresh machine may not have it mounted.

use std::{ffi::CString, path::Path};

use anyhow::{Context, Result, bail};

pub const MOUNT_POINT: &str = "/sys/kernel/tracing";

fn mounted(at: &Path) -> bool {
    at.join("events").is_dir()
}

/// The tracefs root, mounting it at /sys/kernel/tracing when no tracefs is visible.
pub fn ensure_mounted() -> Result<&'static Path> {
    let primary = Path::new(MOUNT_POINT);
    if mounted(primary) {
        return Ok(primary);
    }
    let legacy = Path::new("/sys/kernel/debug/tracing");
    if mounted(legacy) {
        return Ok(legacy);
    }
    let source = CString::new("tracefs").expect("no NUL");
    let target = CString::new(MOUNT_POINT).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {MOUNT_POINT} failed: {err} \
             (mount it yourself: mount -t tracefs tracefs {MOUNT_POINT})"
        );
    }
    tracing::info!("mounted tracefs at {MOUNT_POINT}");
    if !mounted(primary) {
        bail!("tracefs mounted at {MOUNT_POINT} but it has no events/ directory");
    }
    Ok(primary)
}

/// The `format` file of a classic tracepoint, or a clear error if it does not exist.
pub fn format(root: &Path, category: &str, name: &str) -> Result<String> {
    let path = root.join("events").join(category).join(name).join("format");
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "tracepoint {category}/{name} is missing ({} unreadable): trustdrift needs it to \
             follow process exec and exit; the kernel must be built with CONFIG_TRACEPOINTS \
             and the sched events",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tracepoint_is_named_with_what_it_is_for() {
        let scratch = tempfile::Builder::new()
            .prefix("trustdrift-tracefs-")
            .tempdir()
            .unwrap();
        let root = scratch.path();
        std::fs::create_dir_all(root.join("events/sched")).unwrap();
        let err = format(root, "sched", "sched_process_exit").unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("tracepoint sched/sched_process_exit is missing"),
            "{text}"
        );
        assert!(text.contains("exec and exit"), "{text}");
    }
}
