//! CA certificates made by the real openssl CLI, bundles of them, and atomic replacement.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// A self-signed CA: its PEM and the SHA-256 of its DER (as the API names certificates).
#[derive(Clone, Debug)]
pub struct Ca {
    pub pem: String,
    pub sha256: String,
}

/// `n` CAs named `{tag} CA {i}`, valid for two days, made in `dir` (which must not be a
/// trust path the daemon under test follows: openssl reading them is not the workload).
pub fn make_cas(dir: &Path, tag: &str, n: usize) -> Result<Vec<Ca>> {
    (0..n)
        .map(|i| {
            let out = dir.join(format!("ca-{i}.crt"));
            let status = Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj"])
                .arg(format!("/CN={tag} CA {i}"))
                .args(["-keyout", "/dev/null", "-out"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running openssl req (is openssl installed?)")?;
            if !status.success() {
                bail!("openssl req failed ({status})");
            }
            let fp = Command::new("openssl")
                .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
                .arg(&out)
                .output()
                .context("running openssl x509")?;
            if !fp.status.success() {
                bail!("openssl x509 -fingerprint failed ({})", fp.status);
            }
            // "sha256 Fingerprint=AB:CD:..." (the case of the prefix varies by version).
            let text = String::from_utf8_lossy(&fp.stdout);
            let sha256 = text
                .trim()
                .rsplit_once('=')
                .map(|(_, hex)| hex.replace(':', "").to_lowercase())
                .context("openssl x509 -fingerprint: unexpected output")?;
            let pem =
                fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
            fs::remove_file(&out).ok();
            Ok(Ca { pem, sha256 })
        })
        .collect()
}

/// The PEM bundle of the CAs `which` (indexes into `cas`), in that order.
pub fn bundle(cas: &[Ca], which: &BTreeSet<usize>) -> String {
    which.iter().map(|i| cas[*i].pem.as_str()).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    crate::fleet::hex(&Sha256::digest(data))
}

/// Replaces `path` as package managers do: a new file next to it, renamed over it. A
/// process opens either the old version or the new one, never half of one.
pub fn replace_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp-new", name.to_string_lossy()));
    fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} over {}", tmp.display(), path.display()))
}
