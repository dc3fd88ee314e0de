//! Who a process belongs to, read from its cgroup path: container id (containerd, CRI-O,
//! docker, podman), Kubernetes pod UID, systemd unit.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub unit: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`
/// (systemd driver) or a bare `<id>` (cgroupfs driver).
fn container_id(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    let id = stem.rsplit('-').next().unwrap_or(stem);
    is_container_id(id).then(|| id.to_owned())
}

/// `kubepods-burstable-pod<uid with _>.slice` or `pod<uid>`.
fn pod_uid(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    let uid = stem
        .rsplit_once("-pod")
        .map(|(_, u)| u)
        .or_else(|| stem.strip_prefix("pod"))?;
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

pub fn from_cgroup_path(path: &str) -> Attribution {
    let mut out = Attribution {
        cgroup: path.to_owned(),
        ..Attribution::default()
    };
    for component in path.split('/').filter(|c| !c.is_empty()) {
        if let Some(id) = container_id(component) {
            out.container_id = Some(id);
        } else if let Some(uid) = pod_uid(component) {
            out.pod_uid = Some(uid);
        } else if component.ends_with(".service") {
            out.unit = Some(component.to_owned());
        }
    }
    out
}

impl Attribution {
    /// One short word for a table column: container id (12 chars), unit, or cgroup.
    pub fn short(&self) -> String {
        if let Some(id) = &self.container_id {
            return id[..12].to_owned();
        }
        if let Some(unit) = &self.unit {
            return unit.clone();
        }
        if self.cgroup.is_empty() {
            "-".into()
        } else {
            self.cgroup.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn containerd_under_kubernetes_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod5f2b8a1e_3c4d_4e5f_8a9b_0c1d2e3f4a5b.slice/\
             cri-containerd-{ID}.scope"
        );
        let a = from_cgroup_path(&path);
        assert_eq!(a.container_id.as_deref(), Some(ID));
        assert_eq!(
            a.pod_uid.as_deref(),
            Some("5f2b8a1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(a.short(), &ID[..12]);
    }

    #[test]
    fn cgroupfs_driver_docker_crio_and_units() {
        let a = from_cgroup_path(&format!(
            "/kubepods/besteffort/pod5f2b8a1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b/{ID}"
        ));
        assert_eq!(a.container_id.as_deref(), Some(ID));
        assert!(a.pod_uid.is_some());
        assert_eq!(
            from_cgroup_path(&format!("/system.slice/docker-{ID}.scope"))
                .container_id
                .as_deref(),
            Some(ID)
        );
        assert_eq!(
            from_cgroup_path(&format!("/machine.slice/crio-{ID}.scope"))
                .container_id
                .as_deref(),
            Some(ID)
        );
        let unit = from_cgroup_path("/system.slice/nginx.service");
        assert_eq!(unit.unit.as_deref(), Some("nginx.service"));
        assert_eq!(unit.container_id, None);
        assert_eq!(from_cgroup_path("/").short(), "/");
    }
}
