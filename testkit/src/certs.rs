//! Certificates: CAs and leaves with exact validity made in-process, a certificate and
//! key made by the real openssl, bundles of them, their fingerprints computed
//! independently of the daemon (by openssl), and files replaced as package managers
//! replace them.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

/// A CA (or a leaf signed by one) made in-process, with exact validity.
pub struct Cert {
    pub pem: String,
    pub key_pem: String,
    pub sha256: String,
    pub subject_cn: String,
    params_issuer: Option<rcgen::Issuer<'static, rcgen::KeyPair>>,
}

/// The SHA-256 of `data` in lowercase hex, as the API writes fingerprints and versions,
/// computed by openssl: the tests check the daemon's figures against an independent
/// computation.
pub fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("openssl dgst (cargo xtask setup installs openssl)");
    first_word(&out.stdout)
}

/// The SHA-256 of the file at `path`, which openssl reads.
pub fn sha256_of(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(path)
        .output()
        .expect("openssl dgst");
    first_word(&out.stdout)
}

fn first_word(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Cert {
    /// A self-signed CA named `cn`, valid for a day.
    pub fn ca(cn: &str) -> Self {
        Self::ca_valid(
            cn,
            Duration::from_secs(3600),
            Duration::from_secs(86400),
            true,
        )
    }

    /// A self-signed CA named `cn` that expired `ago` ago (it was valid for three years
    /// before): a root a distribution still ships after its end.
    pub fn expired_ca(cn: &str, ago: Duration) -> Self {
        let three_years = Duration::from_secs(3 * 365 * 86400);
        Self::ca_valid(cn, three_years + ago, ago, false)
    }

    /// A self-signed CA valid from `before` ago until `after` from now (`future`) or ago.
    fn ca_valid(cn: &str, before: Duration, after: Duration, future: bool) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        let span = |d: Duration| time::Duration::try_from(d).expect("duration");
        params.not_before = now - span(before);
        params.not_after = if future {
            now + span(after)
        } else {
            now - span(after)
        };
        let cert = params.self_signed(&key).expect("self-signed");
        let pem = cert.pem();
        let sha256 = sha256_hex(cert.der());
        let key_pem = key.serialize_pem();
        Self {
            pem,
            key_pem,
            sha256,
            subject_cn: cn.to_owned(),
            params_issuer: Some(rcgen::Issuer::new(params, key)),
        }
    }

    /// A leaf for `dns` signed by this CA, valid until `valid_for` from now.
    pub fn leaf(&self, dns: &str, valid_for: Duration) -> Self {
        let issuer = self.params_issuer.as_ref().expect("a CA can sign");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![dns.to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, dns);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::try_from(valid_for).expect("duration");
        let cert = params.signed_by(&key, issuer).expect("signed");
        Self {
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            sha256: sha256_hex(cert.der()),
            subject_cn: dns.to_owned(),
            params_issuer: None,
        }
    }
}

/// `n` distinct minimal certificates in PEM (self-signed, one shared key, a short name
/// and serial each): the most certificates a file of a given size can hold, for tests of
/// hostile stores.
pub fn minimal_certificates(n: usize) -> Vec<String> {
    let key = rcgen::KeyPair::generate().expect("key");
    (0..n)
        .map(|i| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, format!("{i:x}"));
            params.serial_number = Some(rcgen::SerialNumber::from(
                (i as u64 + 1).to_be_bytes().to_vec(),
            ));
            params.self_signed(&key).expect("self-signed").pem()
        })
        .collect()
}

/// A self-signed certificate and key made by the real openssl: (cert.pem, key.pem).
pub fn make_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed by the tests (cargo xtask setup installs it)");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

/// A PEM bundle of `certs`, in that order.
pub fn bundle(certs: &[&Cert]) -> String {
    certs.iter().map(|c| c.pem.as_str()).collect()
}

/// Replaces `path` atomically, as package managers and update-ca-certificates do: a new
/// file beside it, renamed over it. A process opens either the old version or the new
/// one, never half of one.
pub fn replace_atomically(path: &Path, content: &str) {
    try_replace_atomically(path, content)
        .unwrap_or_else(|e| panic!("replacing {}: {e}", path.display()));
}

/// [`replace_atomically`], with an error instead of a panic. The new version is written
/// to `.{name}.tmp-new`: hidden, and never the name of another file's new version.
pub fn try_replace_atomically(path: &Path, content: &str) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let tmp = path.with_file_name(format!(".{}.tmp-new", name.to_string_lossy()));
    let context = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    fs::write(&tmp, content).map_err(|e| context(&format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| {
        context(
            &format!("renaming {} over {}", tmp.display(), path.display()),
            e,
        )
    })
}
