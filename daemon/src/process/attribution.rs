//! Who a process belongs to: from its cgroup path, the container id (containerd, CRI-O,
//! docker, podman), Kubernetes pod UID and systemd unit; from the container runtime's
//! OCI bundle annotations, the Kubernetes namespace, pod and container names (no API
//! server needed on the node).
//!
//! Both the bundle (on the node) and a pod's service-account mount (in the container) are
//! read through the safe resolver under a deadline, and a name is kept only if it is a
//! valid Kubernetes name: a container controls its own files, and what it writes there
//! must neither reach outside its root nor become an arbitrary metric label.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::process::{
    deadline::{self, Deadline},
    rootfs::Root,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    pub cgroup: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub unit: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

/// Where runtimes keep a container's OCI bundle (`<dir>/<id>/config.json`, or
/// `<dir>/<id>/userdata/config.json` for CRI-O).
pub const BUNDLE_DIRS: &[&str] = &[
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io",
    "/run/containerd/io.containerd.runtime.v2.task/moby",
    "/run/containers/storage/overlay-containers",
    "/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby",
];

/// Where a pod's service-account mount names its namespace, inside the container.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// An OCI bundle's config.json is a few KiB; a runtime that wrote more is not believed.
const MAX_BUNDLE_CONFIG: u64 = 1 << 20;

/// (namespace, pod, container) of one container, as far as they are known.
type K8sNames = (Option<String>, Option<String>, Option<String>);

/// Kubernetes names of containers, by container id, read once.
pub struct Names {
    bundle_dirs: Vec<PathBuf>,
    known: HashMap<String, K8sNames>,
    /// The node's root, where runtimes keep bundles.
    host: Option<Arc<Root>>,
}

impl Default for Names {
    fn default() -> Self {
        Self::new(BUNDLE_DIRS.iter().map(PathBuf::from).collect())
    }
}

/// A DNS-1123 label (RFC 1123): what Kubernetes accepts as a namespace or container name.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A DNS-1123 subdomain: what Kubernetes accepts as a pod name.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn annotation(
    config: &serde_json::Value,
    keys: &[&str],
    valid: fn(&str) -> bool,
) -> Option<String> {
    let annotations = config.get("annotations")?;
    keys.iter()
        .find_map(|k| annotations.get(*k)?.as_str())
        .filter(|v| valid(v))
        .map(str::to_owned)
}

fn names_in(config: &serde_json::Value) -> K8sNames {
    (
        annotation(
            config,
            &[
                "io.kubernetes.cri.sandbox-namespace",
                "io.kubernetes.pod.namespace",
            ],
            is_dns1123_label,
        ),
        annotation(
            config,
            &["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"],
            is_dns1123_subdomain,
        ),
        annotation(
            config,
            &[
                "io.kubernetes.cri.container-name",
                "io.kubernetes.container.name",
            ],
            is_dns1123_label,
        ),
    )
}

impl Names {
    pub fn new(bundle_dirs: Vec<PathBuf>) -> Self {
        Self {
            bundle_dirs,
            known: HashMap::new(),
            host: Root::host().ok().map(Arc::new),
        }
    }

    /// (namespace, pod, container) from the container's OCI bundle annotations.
    fn lookup(&mut self, io: &mut Deadline, id: &str) -> K8sNames {
        if let Some(hit) = self.known.get(id) {
            return hit.clone();
        }
        let Some(host) = self.host.clone() else {
            return K8sNames::default();
        };
        let candidates: Vec<PathBuf> = self
            .bundle_dirs
            .iter()
            .flat_map(|d| {
                [
                    d.join(id).join("config.json"),
                    d.join(id).join("userdata/config.json"),
                ]
            })
            .collect();
        let found = io
            .run(deadline::key(("bundle", id)), move || {
                candidates.iter().find_map(|p| {
                    let bytes = host.read_small(p, MAX_BUNDLE_CONFIG).ok()?;
                    serde_json::from_slice::<serde_json::Value>(&bytes).ok()
                })
            })
            .ok()
            .flatten()
            .map(|config| names_in(&config));
        let Some(found) = found else {
            // Not cached: the runtime may not have written the bundle yet.
            return K8sNames::default();
        };
        if self.known.len() > 4096 {
            self.known.clear();
        }
        self.known.insert(id.to_owned(), found.clone());
        found
    }

    /// Fills the Kubernetes names of `a` (a process whose root is `root`), when it runs in
    /// a container.
    pub fn enrich(&mut self, a: &mut Attribution, io: &mut Deadline, root: Option<Arc<Root>>) {
        let Some(id) = a.container_id.clone() else {
            return;
        };
        let (namespace, pod, container) = self.lookup(io, &id);
        a.namespace = namespace.or_else(|| {
            // Without runtime annotations, a pod's service-account mount still names it:
            // read inside the container's own root, as a small regular file only.
            let root = root?;
            io.run(deadline::key(("namespace", &id)), move || {
                root.read_small(Path::new(SERVICE_ACCOUNT_NAMESPACE), 256)
                    .ok()
            })
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| is_dns1123_label(s))
        });
        a.pod = pod;
        a.container = container;
    }
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
    use std::fs;

    use super::*;
    use crate::process::deadline::Deadline;

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

    #[test]
    fn kubernetes_names_come_from_the_runtime_bundle() {
        let scratch = tempfile::Builder::new()
            .prefix("trustdrift-names-")
            .tempdir()
            .unwrap();
        let base = scratch.path();
        let containerd = base.join("containerd");
        let crio = base.join("crio");
        fs::create_dir_all(containerd.join(ID)).unwrap();
        fs::write(
            containerd.join(ID).join("config.json"),
            r#"{"annotations": {"io.kubernetes.cri.sandbox-namespace": "payments",
                "io.kubernetes.cri.sandbox-name": "agent-7f9c", "io.kubernetes.cri.container-name": "agent"}}"#,
        )
        .unwrap();
        let other = "f".repeat(64);
        fs::create_dir_all(crio.join(&other).join("userdata")).unwrap();
        fs::write(
            crio.join(&other).join("userdata/config.json"),
            r#"{"annotations": {"io.kubernetes.pod.namespace": "edge", "io.kubernetes.pod.name": "envoy-1",
                "io.kubernetes.container.name": "envoy"}}"#,
        )
        .unwrap();
        let mut names = Names::new(vec![containerd, crio]);
        let mut io = Deadline::new(crate::process::deadline::Limits::default());
        let mut a = from_cgroup_path(&format!(
            "/kubepods/pod5f2b8a1e-3c4d-4e5f-8a9b-0c1d2e3f4a5b/{ID}"
        ));
        names.enrich(&mut a, &mut io, None);
        assert_eq!(
            (
                a.namespace.as_deref(),
                a.pod.as_deref(),
                a.container.as_deref()
            ),
            (Some("payments"), Some("agent-7f9c"), Some("agent"))
        );
        let mut b = from_cgroup_path(&format!("/system.slice/crio-{other}.scope"));
        names.enrich(&mut b, &mut io, None);
        assert_eq!(b.container.as_deref(), Some("envoy"));
        let mut host = from_cgroup_path("/system.slice/nginx.service");
        names.enrich(&mut host, &mut io, Root::own().ok().map(Arc::new));
        assert_eq!(host.namespace, None);
    }

    #[test]
    fn only_valid_kubernetes_names_become_labels() {
        for ok in [
            "default",
            "kube-system",
            "a",
            "payments-7f9c",
            &"a".repeat(63),
        ] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in [
            "",
            "Default",
            "-lead",
            "trail-",
            "under_score",
            "new\nline",
            "sp ace",
            &"a".repeat(64),
            "ns\u{0}",
        ] {
            assert!(!is_dns1123_label(bad), "{bad:?}");
        }
        assert!(is_dns1123_subdomain("agent-7f9c.payments"));
        assert!(!is_dns1123_subdomain("agent..x"));
        assert!(!is_dns1123_subdomain(&"a.".repeat(130)));
    }

    #[test]
    fn annotations_that_are_not_kubernetes_names_are_dropped() {
        let config: serde_json::Value = serde_json::from_str(
            r#"{"annotations": {"io.kubernetes.cri.sandbox-namespace": "root:x:0:0:root:/root:/bin/bash",
                "io.kubernetes.cri.sandbox-name": "ok-pod", "io.kubernetes.cri.container-name": "UPPER"}}"#,
        )
        .unwrap();
        assert_eq!(names_in(&config), (None, Some("ok-pod".into()), None));
    }
}
