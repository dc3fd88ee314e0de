//! A lint, run as a test: nothing but `process::procfs` (the kernel's own files about a
//! process, bounded) and `process::rootfs` (the one safe resolver into its root) may name
//! a path under `/proc/<pid>/`. A plain `std::fs` read of `/proc/<pid>/root/...`,
//! `.../cwd/...` or `.../fd/...` follows the process's links from the daemon's side and is
//! exactly how a container makes a root daemon read the host's files.

use std::{fs, path::Path};

/// Files allowed to name `/proc/<pid>/` paths.
const ALLOWED: &[&str] = &["process/procfs.rs", "process/rootfs.rs"];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("daemon/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a line names a path under `/proc/<pid>/`: a pid spliced in (`/proc/{pid}`,
/// `/proc/{}`), a literal pid (`/proc/1/`), or `/proc` joined with something.
fn names_a_process_path(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or_default();
    code.match_indices("/proc/").any(|(i, _)| {
        let rest = &code[i + "/proc/".len()..];
        rest.starts_with('{') || rest.starts_with(|c: char| c.is_ascii_digit())
    }) || (code.contains("\"/proc\"") && code.contains(".join("))
}

#[test]
fn only_procfs_and_rootfs_name_paths_under_proc_pid() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if ALLOWED.contains(&relative.as_str()) {
            continue;
        }
        let text = fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if names_a_process_path(line) {
                offenders.push(format!("{relative}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "read /proc/<pid>/ through process::procfs or process::rootfs only:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_lint_catches_what_it_is_for() {
    assert!(names_a_process_path(
        r#"fs::read_to_string(format!("/proc/{pid}/root/var/run/secrets"))"#
    ));
    assert!(names_a_process_path(
        r#"let p = format!("/proc/{}/cwd", pid);"#
    ));
    assert!(names_a_process_path(
        r#"File::open("/proc/1/root/etc/passwd")"#
    ));
    assert!(names_a_process_path(
        r#"Path::new("/proc").join(pid.to_string())"#
    ));
    assert!(!names_a_process_path(
        r#"fs::read_to_string("/proc/self/status")"#
    ));
    assert!(!names_a_process_path(r#"// see /proc/{pid}/root"#));
}
