//! Scenario 4 — containers: a process in its own mount namespace with its own store.
//! Changes inside and outside are told apart, and a subPath-style mount (the file bound
//! at the version it had when the container started) is frozen: its source changing is
//! not drift for the process that sees the frozen file.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command, time::Instant};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, bundle, spawn_after_read};

use crate::support::{file, noticed, shas};

/// Reads `path` (as the process sees it) once and stays; `setup` runs first inside a
/// private mount namespace (as a container runtime sets up mounts), if given.
fn reader(setup: Option<&str>, path: &str) -> Guarded {
    let script = format!(
        "import sys\nopen({path:?}, 'rb').read()\nprint('read', flush=True)\nsys.stdin.read()"
    );
    let mut cmd = match setup {
        Some(setup) => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!("{setup} && exec \"$0\" \"$@\""));
            c.arg("/usr/bin/python3");
            c
        }
        None => Command::new("/usr/bin/python3"),
    };
    spawn_after_read(cmd.args(["-I", "-c", &script]))
}

#[test]
fn a_containers_own_store_and_the_hosts_drift_separately() {
    let dir = TempDir::new("containers-own-store");
    let host_store = dir.join("app-certs");
    let container_store = dir.join("container-layer/app-certs");
    fs::create_dir_all(&host_store).unwrap();
    fs::create_dir_all(&container_store).unwrap();
    let path = host_store.join("ca-bundle.pem");
    let shared = Cert::ca("Image Root");
    fs::write(&path, bundle(&[&shared])).unwrap();
    fs::write(container_store.join("ca-bundle.pem"), bundle(&[&shared])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };
    let on_host = reader(None, path.to_str().unwrap());
    let mount = format!(
        "mount --bind {} {}",
        container_store.display(),
        host_store.display()
    );
    let in_container = reader(Some(&mount), path.to_str().unwrap());
    for p in [&on_host, &in_container] {
        daemon.wait_for("fresh", p.pid(), |p| p["verdict"] == "fresh");
    }

    let host_ca = Cert::ca("Host Operator CA");
    let changed = Instant::now();
    fs::write(&path, bundle(&[&shared, &host_ca])).unwrap();
    let p = noticed(
        &daemon,
        "containers/host-change",
        "host stale",
        on_host.pid(),
        changed,
        |p| p["verdict"] == "stale",
    );
    assert_eq!(
        shas(&file(&p, path.to_str().unwrap())["missing_cas"]),
        vec![host_ca.sha256]
    );
    assert_eq!(
        daemon.process(in_container.pid()).unwrap()["verdict"],
        "fresh",
        "the container does not see the host's file"
    );

    let image_ca = Cert::ca("Image Update CA");
    let changed = Instant::now();
    fs::write(
        container_store.join("ca-bundle.pem"),
        bundle(&[&shared, &image_ca]),
    )
    .unwrap();
    let p = noticed(
        &daemon,
        "containers/container-change",
        "container stale",
        in_container.pid(),
        changed,
        |p| p["verdict"] == "stale",
    );
    assert_eq!(
        shas(&file(&p, path.to_str().unwrap())["missing_cas"]),
        vec![image_ca.sha256],
        "diffed against the container's own store"
    );
}

/// A Kubernetes secret volume: `..<timestamp>/ca.crt`, `..data -> ..<timestamp>`,
/// `ca.crt -> ..data/ca.crt`.
fn secret_volume(dir: &Path, generation: u32, content: &str) {
    let data = dir.join(format!("..2026_11_23_00_00_{generation:02}.000000001"));
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("ca.crt"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(data.file_name().unwrap(), &tmp).unwrap();
    // The kubelet's AtomicWriter: swap ..data in one rename, then drop the old payload.
    let old = fs::read_link(dir.join("..data")).ok();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("ca.crt").exists() {
        symlink("..data/ca.crt", dir.join("ca.crt")).unwrap();
    }
    if let Some(old) = old {
        let _ = fs::remove_dir_all(dir.join(old));
    }
}

#[test]
fn a_subpath_mounted_file_frozen_at_its_old_version_is_not_drift() {
    let dir = TempDir::new("containers-subpath");
    let volume = dir.join("secret-volume");
    fs::create_dir_all(&volume).unwrap();
    let v1 = Cert::ca("Cluster CA 2025");
    secret_volume(&volume, 1, &bundle(&[&v1]));
    // What a container with `subPath: ca.crt` sees: the file, bound once at start.
    let app = dir.join("app");
    fs::create_dir_all(&app).unwrap();
    let frozen = app.join("ca.crt");
    fs::write(&frozen, "").unwrap();
    // Rescans every second: the frozen file is looked at again after the swap.
    let Some(daemon) = Daemon::start(&["--set", "catalog.rescan_interval=1s"]) else {
        return;
    };
    let projected = volume.join("ca.crt");
    let live = reader(None, projected.to_str().unwrap());
    let mount = format!(
        "mount --bind {} {}",
        fs::canonicalize(&projected).unwrap().display(),
        frozen.display()
    );
    let subpath = reader(Some(&mount), frozen.to_str().unwrap());
    for p in [&live, &subpath] {
        daemon.wait_for("fresh", p.pid(), |p| p["verdict"] == "fresh");
    }

    let v2 = Cert::ca("Cluster CA 2026");
    let changed = Instant::now();
    secret_volume(&volume, 2, &bundle(&[&v1, &v2]));
    let p = noticed(
        &daemon,
        "containers/subpath",
        "projected stale",
        live.pid(),
        changed,
        |p| p["verdict"] == "stale",
    );
    assert_eq!(
        shas(&file(&p, projected.to_str().unwrap())["missing_cas"]),
        vec![v2.sha256]
    );
    // Give the rescan time to look at the frozen file again (nothing to wait for: the
    // point is that nothing happens).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let p = daemon.process(subpath.pid()).unwrap();
    assert_eq!(
        p["verdict"], "fresh",
        "the subPath file did not change: {p}"
    );
    let f = file(&p, frozen.to_str().unwrap());
    assert_eq!(f["read_version"]["sha256"], f["current_version"]["sha256"]);
}
