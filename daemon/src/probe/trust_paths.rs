//! Which paths are trust material: the prefixes and suffixes the kernel filter matches,
//! their defaults, validation, and their encoding for the probe's maps.

use thiserror::Error;
use trustdrift_common::{
    FilterTable, MAX_SUFFIXES, PREFIX_CAP, PrefixKey, SUFFIX_CAP, SuffixRule, prefix_value,
    quick_slot,
};

/// Stores of OpenSSL, GnuTLS, NSS/p11-kit across Debian/Ubuntu, RHEL/Fedora, Alpine and
/// SUSE layouts, and the places Kubernetes mounts service-account and secret material.
pub const DEFAULT_PREFIXES: &[&str] = &[
    // OpenSSL's OPENSSLDIR (Debian/Ubuntu /usr/lib/ssl, source builds /usr/local/ssl)
    // and the system stores: Debian/Alpine /etc/ssl, RHEL/Fedora/SUSE /etc/pki.
    "/etc/ssl/",
    "/usr/lib/ssl/",
    "/usr/local/ssl/",
    "/etc/pki/",
    // ca-certificates sources (Debian, Alpine) and generated stores (SUSE).
    "/etc/ca-certificates/",
    "/usr/share/ca-certificates/",
    "/usr/local/share/ca-certificates/",
    "/var/lib/ca-certificates/",
    // p11-kit trust sources (RHEL/Fedora/SUSE), read by NSS and GnuTLS through p11-kit.
    "/usr/share/pki/",
    "/etc/gnutls/",
    // Kubernetes service-account and projected/secret volumes.
    "/var/run/secrets/",
    "/run/secrets/",
];

/// Certificate, key and keystore files wherever they live (Java `cacerts`, certifi's
/// `cacert.pem`, application-mounted certificates).
pub const DEFAULT_SUFFIXES: &[&str] = &[
    ".pem",
    ".crt",
    ".cer",
    ".der",
    ".key",
    ".p12",
    ".pfx",
    ".jks",
    "/cacerts",
    "/jssecacerts",
    ".keystore",
    ".truststore",
    "/cert9.db",
];

/// Files under a trust prefix that are configuration, not trust material: every OpenSSL
/// program reads openssl.cnf at start, and following it would only cost.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "/etc/ssl/openssl.cnf",
    "/usr/lib/ssl/openssl.cnf",
    "/usr/local/ssl/openssl.cnf",
    "/etc/pki/tls/openssl.cnf",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TrustPathError {
    #[error("prefix {0:?} must be an absolute path")]
    RelativePrefix(String),
    #[error("prefix {0:?} is longer than {PREFIX_CAP} bytes (the kernel's LPM trie limit)")]
    PrefixTooLong(String),
    #[error("suffix {0:?} must be 1 to {SUFFIX_CAP} bytes")]
    SuffixLength(String),
    #[error("{count} suffixes configured; the probe compares at most {MAX_SUFFIXES}")]
    TooManySuffixes { count: usize },
}

/// The filter the kernel applies, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustPaths {
    pub prefixes: Vec<String>,
    pub suffixes: Vec<String>,
    pub excludes: Vec<String>,
}

impl TrustPaths {
    pub fn defaults() -> Self {
        Self {
            prefixes: DEFAULT_PREFIXES.iter().map(|s| s.to_string()).collect(),
            suffixes: DEFAULT_SUFFIXES.iter().map(|s| s.to_string()).collect(),
            excludes: DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Checks every entry against what the probe can represent.
    pub fn validate(&self) -> Result<(), TrustPathError> {
        for p in self.prefixes.iter().chain(&self.excludes) {
            if !p.starts_with('/') {
                return Err(TrustPathError::RelativePrefix(p.clone()));
            }
            if p.len() > PREFIX_CAP {
                return Err(TrustPathError::PrefixTooLong(p.clone()));
            }
        }
        for s in &self.suffixes {
            if s.is_empty() || s.len() > SUFFIX_CAP {
                return Err(TrustPathError::SuffixLength(s.clone()));
            }
        }
        if self.suffixes.len() > MAX_SUFFIXES {
            return Err(TrustPathError::TooManySuffixes {
                count: self.suffixes.len(),
            });
        }
        Ok(())
    }

    /// LPM entries: prefixes that include, exclusions that veto (longest match wins).
    pub fn prefix_entries(&self) -> Vec<(PrefixKey, u8)> {
        let entry = |p: &String, value| {
            let mut data = [0u8; PREFIX_CAP];
            data[..p.len()].copy_from_slice(p.as_bytes());
            (
                PrefixKey {
                    prefixlen: (p.len() * 8) as u32,
                    data,
                },
                value,
            )
        };
        self.prefixes
            .iter()
            .map(|p| entry(p, prefix_value::INCLUDE))
            .chain(
                self.excludes
                    .iter()
                    .map(|p| entry(p, prefix_value::EXCLUDE)),
            )
            .collect()
    }

    /// Bytes of the path head the prefix quick-reject hashes: the shortest include prefix.
    fn head_len(&self) -> u32 {
        self.prefixes
            .iter()
            .map(|p| p.len().min(8) as u32)
            .min()
            .unwrap_or(0)
    }

    /// Bytes of the path tail the suffix quick-reject hashes: the shortest suffix.
    fn tail_len(&self) -> u32 {
        self.suffixes
            .iter()
            .map(|s| s.len().min(8) as u32)
            .min()
            .unwrap_or(0)
    }

    /// Everything the probe's `FILTER` map holds: quick-reject bitmaps, their
    /// parameters and the suffix rules.
    pub fn filter_table(&self) -> FilterTable {
        let mut table = FilterTable {
            head_len: self.head_len(),
            tail_len: self.tail_len(),
            ..FilterTable::default()
        };
        for (slot, s) in table.rules.iter_mut().zip(&self.suffixes) {
            if let Some(rule) = SuffixRule::new(s.as_bytes()) {
                *slot = rule;
                table.suffix_count += 1;
            }
        }
        let word = |bytes: &[u8]| {
            let mut w = [0u8; 8];
            w[..bytes.len()].copy_from_slice(bytes);
            u64::from_le_bytes(w)
        };
        let head_len = table.head_len as usize;
        for p in &self.prefixes {
            let (i, bit) = quick_slot(word(&p.as_bytes()[..head_len]));
            table.heads[i as usize] |= bit;
        }
        let tail_len = table.tail_len as usize;
        for s in &self.suffixes {
            let lower = s.to_ascii_lowercase();
            let (i, bit) = quick_slot(word(&lower.as_bytes()[lower.len() - tail_len..]));
            table.tails[i as usize] |= bit;
        }
        table
    }

    /// A table whose bitmaps let through whatever `table` or `other` lets through, so a
    /// filter update never rejects, even for an instant, a path both versions accept.
    pub fn union_bitmaps(table: &FilterTable, other: &FilterTable) -> FilterTable {
        let mut merged = *table;
        for (a, b) in merged.heads.iter_mut().zip(&other.heads) {
            *a |= b;
        }
        for (a, b) in merged.tails.iter_mut().zip(&other.tails) {
            *a |= b;
        }
        merged
    }

    /// The kernel filter's semantics in userspace, for what the daemon finds without the
    /// probe (files held open before it started): an exclusion at least as long as the
    /// matching prefix vetoes; suffixes compare ASCII case-insensitively.
    pub fn matches(&self, path: &str) -> bool {
        let longest = |list: &[String]| {
            list.iter()
                .filter(|p| path.starts_with(p.as_str()))
                .map(|p| p.len())
                .max()
        };
        match (longest(&self.prefixes), longest(&self.excludes)) {
            (_, Some(ex)) if longest(&self.prefixes).is_none_or(|inc| ex >= inc) => {
                return false;
            }
            (Some(_), _) => return true,
            _ => {}
        }
        let lower = path.to_ascii_lowercase();
        self.suffixes
            .iter()
            .any(|s| lower.ends_with(&s.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fit_the_probe() {
        let d = TrustPaths::defaults();
        d.validate().unwrap();
        let table = d.filter_table();
        assert_eq!(table.suffix_count as usize, d.suffixes.len());
        assert_eq!((table.head_len, table.tail_len), (8, 4));
    }

    #[test]
    fn default_filter_covers_the_common_stores() {
        let d = TrustPaths::defaults();
        for path in [
            "/etc/ssl/certs/ca-certificates.crt",
            "/usr/lib/ssl/cert.pem",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/pki/ca-trust/extracted/java/cacerts",
            "/var/lib/ca-certificates/ca-bundle.pem",
            "/etc/ssl/certs/java/cacerts",
            "/usr/lib/jvm/java-17-openjdk-amd64/lib/security/cacerts",
            "/usr/lib/python3/dist-packages/certifi/cacert.pem",
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
            "/srv/app/tls/server.KEY",
            "/etc/ssl/certs",
        ] {
            assert!(d.matches(path), "{path} should match");
        }
        for path in [
            "/etc/ssl/openssl.cnf",
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/etc/passwd",
            "/tmp/notes.txt",
        ] {
            assert!(!d.matches(path), "{path} should not match");
        }
    }

    #[test]
    fn invalid_entries_are_named() {
        let mut t = TrustPaths::defaults();
        t.prefixes.push("etc/ssl".into());
        assert_eq!(
            t.validate(),
            Err(TrustPathError::RelativePrefix("etc/ssl".into()))
        );
        let mut t = TrustPaths::defaults();
        t.suffixes.push("a-very-long-suffix-indeed".into());
        assert!(matches!(t.validate(), Err(TrustPathError::SuffixLength(_))));
        let mut t = TrustPaths::defaults();
        t.suffixes = (0..20).map(|i| format!(".x{i}")).collect();
        assert_eq!(
            t.validate(),
            Err(TrustPathError::TooManySuffixes { count: 20 })
        );
    }
}
