//! The host's reference view: the CA store a process started now would load, as
//! rustls-native-certs finds it (SSL_CERT_FILE / SSL_CERT_DIR, else the distribution's
//! own locations) when the daemon's filesystem is the host's; from the host root's
//! default store when the daemon runs in a container (its image is not the node).
//! Reloaded when one of the host's default stores changes.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use crate::stores::formats::{self, CertInfo};

/// Where each distribution keeps the CA store a process started now would load. A
/// TLS-capable process that started before one of these last changed (in its root)
/// may hold an older store: it is listed as unverified.
pub const DEFAULT_CA_STORES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
    "/var/lib/ca-certificates/ca-bundle.pem",
    "/etc/ssl/certs/java/cacerts",
    "/etc/pki/ca-trust/extracted/java/cacerts",
];

#[derive(Clone, Debug)]
pub struct Reference {
    pub loaded_at: SystemTime,
    /// Where it came from.
    pub source: String,
    /// By SHA-256 fingerprint.
    pub certs: BTreeMap<String, Arc<CertInfo>>,
    pub errors: Vec<String>,
}

pub fn load() -> Reference {
    let found = rustls_native_certs::load_native_certs();
    let mut certs = BTreeMap::new();
    let mut errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
    for der in &found.certs {
        let parsed = formats::parse(der.as_ref());
        errors.extend(parsed.errors);
        for c in parsed.certs {
            certs.insert(c.sha256.clone(), Arc::new(c));
        }
    }
    Reference {
        loaded_at: SystemTime::now(),
        source: "rustls-native-certs".into(),
        certs,
        errors,
    }
}

/// The reference from a store the catalog read in the host root.
pub fn from_store(path: &str, certs: Vec<CertInfo>, errors: Vec<String>) -> Reference {
    Reference {
        loaded_at: SystemTime::now(),
        source: format!("{path} in the host root"),
        certs: certs
            .into_iter()
            .map(|c| (c.sha256.clone(), Arc::new(c)))
            .collect(),
        errors,
    }
}
