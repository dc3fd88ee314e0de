//! What tells two contents apart, and what of it may leave the daemon.
//!
//! Certificates are public: their SHA-256 (and a bundle's) is published, as every
//! certificate tool does. Anything else a process reads under a trust path may be a secret
//! (a private key, a password mounted at `/run/secrets/...`); a plain digest of it would let
//! anyone who reads the API, the metrics or the state file test guesses offline. Such
//! content is told apart by HMAC-SHA-256 under a random per-node key that never leaves
//! kernel memory (it lives in a pinned BPF map, so it survives daemon restarts but not a
//! reboot), and the keyed digest is never published.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

/// The content identity of a version.
#[derive(Clone, Copy, Debug)]
pub enum Digest {
    /// SHA-256 of the bytes: public trust material (certificates, and no key material).
    Sha256([u8; 32]),
    /// HMAC-SHA-256 of the bytes under this node's key: everything else.
    Keyed([u8; 32]),
    /// A keyed digest made under a key that is gone (restored from an earlier run whose
    /// key did not survive): equal to nothing; the file's identity stands in.
    Foreign,
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Digest::Sha256(a), Digest::Sha256(b)) | (Digest::Keyed(a), Digest::Keyed(b)) => a == b,
            _ => false,
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Digest {
    /// The bytes that index it (kind and value), `None` for a foreign digest.
    pub fn index(&self) -> Option<(bool, [u8; 32])> {
        match self {
            Digest::Sha256(d) => Some((false, *d)),
            Digest::Keyed(d) => Some((true, *d)),
            Digest::Foreign => None,
        }
    }

    /// The SHA-256 in hex, when it may be published.
    pub fn public_hex(&self) -> Option<String> {
        match self {
            Digest::Sha256(d) => Some(hex(d)),
            Digest::Keyed(_) | Digest::Foreign => None,
        }
    }

    pub fn is_public(&self) -> bool {
        matches!(self, Digest::Sha256(_))
    }

    /// The form kept in the state file: `sha256:<hex>`, `hmac:<hex>` or `foreign`.
    pub fn to_saved(&self) -> String {
        match self {
            Digest::Sha256(d) => format!("sha256:{}", hex(d)),
            Digest::Keyed(d) => format!("hmac:{}", hex(d)),
            Digest::Foreign => "foreign".to_owned(),
        }
    }

    /// Reads [`Digest::to_saved`]; `same_key`: the keyed digests were made under the key
    /// in use now. A bare hex string is a public SHA-256 of state format 1, whose digests
    /// were not all public: they come back as foreign.
    pub fn from_saved(s: &str, same_key: bool) -> Option<Self> {
        if let Some(h) = s.strip_prefix("sha256:") {
            return unhex(h).map(Digest::Sha256);
        }
        if let Some(h) = s.strip_prefix("hmac:") {
            let d = unhex(h)?;
            return Some(if same_key {
                Digest::Keyed(d)
            } else {
                Digest::Foreign
            });
        }
        (s == "foreign" || unhex(s).is_some()).then_some(Digest::Foreign)
    }
}

/// This node's key for [`Digest::Keyed`].
#[derive(Clone)]
pub struct NodeKey([u8; 32]);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.id())
    }
}

impl NodeKey {
    /// A fresh random key.
    pub fn random() -> std::io::Result<Self> {
        let mut key = [0u8; 32];
        let mut filled = 0;
        while filled < key.len() {
            // SAFETY: writes at most the remaining length into the array.
            let n = unsafe {
                libc::getrandom(key[filled..].as_mut_ptr().cast(), key.len() - filled, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(Self(key))
    }

    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this never fails.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }

    /// HMAC-SHA-256 of `bytes`.
    pub fn keyed(&self, bytes: &[u8]) -> [u8; 32] {
        let mut mac = self.mac();
        mac.update(bytes);
        mac.finalize().into_bytes().into()
    }

    /// A public name for the key (to tell whether saved keyed digests were made under
    /// it), from which the key cannot be recovered.
    pub fn id(&self) -> String {
        hex(&self.keyed(b"trustdrift node key id")[..8])
    }

    /// The digest of `bytes`: public when `public`, keyed otherwise.
    pub fn digest(&self, bytes: &[u8], public: bool) -> Digest {
        if public {
            Digest::Sha256(Sha256::digest(bytes).into())
        } else {
            Digest::Keyed(self.keyed(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_gets_a_keyed_digest_that_differs_per_node_and_is_never_public() {
        let (a, b) = (NodeKey::random().unwrap(), NodeKey::random().unwrap());
        let secret = b"hunter2\n";
        let (da, db) = (a.digest(secret, false), b.digest(secret, false));
        assert_eq!(da, a.digest(secret, false), "stable under one key");
        assert_ne!(da, db, "another node cannot compare");
        assert_eq!(da.public_hex(), None);
        let plain: [u8; 32] = Sha256::digest(secret).into();
        assert!(!da.to_saved().contains(&hex(&plain)));
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn public_digests_are_sha256_and_round_trip() {
        let k = NodeKey::random().unwrap();
        let d = k.digest(b"-----BEGIN CERTIFICATE-----", true);
        assert_eq!(d.public_hex().unwrap().len(), 64);
        assert_eq!(Digest::from_saved(&d.to_saved(), false), Some(d));
        let keyed = k.digest(b"x", false);
        assert_eq!(Digest::from_saved(&keyed.to_saved(), true), Some(keyed));
        // Under another key a keyed digest is foreign: equal to nothing, itself included.
        let foreign = Digest::from_saved(&keyed.to_saved(), false).unwrap();
        assert!(matches!(foreign, Digest::Foreign));
        assert!(foreign != Digest::Foreign);
        // Format 1 stored bare hex for everything: foreign too.
        assert!(matches!(
            Digest::from_saved(&"ab".repeat(32), true),
            Some(Digest::Foreign)
        ));
    }
}
