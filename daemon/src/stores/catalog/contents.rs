//! What a version of a trust file holds, and the cache that spares reading the same
//! content twice: containers sharing an image see the same (device, inode, size, mtime)
//! from many roots, and a file rewritten with the same bytes shares one parse.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    mem::size_of,
    sync::{Arc, Weak},
};

use crate::{
    budget::Charge,
    stores::{
        digest::Digest,
        formats::{CertInfo, ContentKind},
        identity::FileIdentity,
    },
};

/// What a version holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// A regular file, parsed (private keys are only recognised: no certificates, no
    /// bytes).
    File {
        kind: ContentKind,
        certs: Vec<Arc<CertInfo>>,
        errors: Vec<String>,
    },
    /// A directory store: its entries (by name) and what each holds.
    Directory {
        entries: BTreeMap<String, Arc<Content>>,
        errors: Vec<String>,
    },
    /// Present but not readable as trust material (too large, a FIFO or device, ...).
    Unreadable { reason: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Content {
    /// What tells it apart from other content: public SHA-256 for certificates, a keyed
    /// digest for anything else (see `stores::digest`).
    pub digest: Digest,
    pub size: u64,
    pub shape: Shape,
    /// Its share of the budget for parsed content, given back when it is dropped.
    pub charge: Charge,
}

/// What a content's parse holds in memory, about: certificates (their strings, the
/// struct, the `Arc` and its pointer), error lines, a directory's entry names (the
/// entries are contents of their own, charged themselves).
pub fn weight(shape: &Shape) -> u64 {
    let strings = |list: &[String]| -> usize { list.iter().map(|e| e.capacity() + 24).sum() };
    let bytes = match shape {
        Shape::File { certs, errors, .. } => {
            certs
                .iter()
                .map(|c| {
                    size_of::<CertInfo>()
                        + 16
                        + 8
                        + c.subject.capacity()
                        + c.issuer.capacity()
                        + c.serial.capacity()
                        + c.sha256.capacity()
                        + c.spki_sha256.capacity()
                })
                .sum::<usize>()
                + strings(errors)
        }
        Shape::Directory { entries, errors } => {
            entries.keys().map(|k| k.capacity() + 64).sum::<usize>() + strings(errors)
        }
        Shape::Unreadable { reason } => reason.capacity(),
    };
    (bytes + size_of::<Content>()) as u64
}

impl Content {
    /// The SHA-256 that may be published: certificates only.
    pub fn sha256_hex(&self) -> Option<String> {
        self.digest.public_hex()
    }

    /// Whether two contents hold the same bytes.
    pub fn same_as(&self, other: &Content) -> bool {
        self.digest == other.digest
    }

    /// Every certificate in this content (a directory's through its entries), by
    /// fingerprint.
    pub fn certificates(&self) -> BTreeMap<String, Arc<CertInfo>> {
        let mut out = BTreeMap::new();
        match &self.shape {
            Shape::File { certs, .. } => {
                for c in certs {
                    out.insert(c.sha256.clone(), Arc::clone(c));
                }
            }
            Shape::Directory { entries, .. } => {
                for e in entries.values() {
                    out.extend(e.certificates());
                }
            }
            Shape::Unreadable { .. } => {}
        }
        out
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.shape {
            Shape::File { kind, .. } => match kind {
                ContentKind::PemBundle => "pem_bundle",
                ContentKind::DerCertificate => "der_certificate",
                ContentKind::Jks => "jks",
                ContentKind::Pkcs12 => "pkcs12",
                ContentKind::PrivateKey => "private_key",
                ContentKind::Unknown => "unknown",
            },
            Shape::Directory { .. } => "directory",
            Shape::Unreadable { .. } => "unreadable",
        }
    }

    /// Whether this holds anything TLS trusts or presents: a certificate or a key (a
    /// directory through its entries). DH parameters or notes named `.pem` do not.
    pub fn is_trust_material(&self) -> bool {
        match &self.shape {
            Shape::File { kind, certs, .. } => {
                !certs.is_empty() || *kind == ContentKind::PrivateKey
            }
            Shape::Directory { entries, .. } => entries.values().any(|e| e.is_trust_material()),
            Shape::Unreadable { .. } => true,
        }
    }

    pub fn errors(&self) -> Vec<String> {
        match &self.shape {
            Shape::File { errors, .. } | Shape::Directory { errors, .. } => errors.clone(),
            Shape::Unreadable { reason } => vec![reason.clone()],
        }
    }
}

/// The cache key: the same (device, inode, size, mtime) is the same content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ContentKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl From<&FileIdentity> for ContentKey {
    fn from(i: &FileIdentity) -> Self {
        Self {
            dev: i.dev,
            ino: i.ino,
            size: i.size,
            mtime_ns: i.mtime_ns,
        }
    }
}

/// Parsed contents by file identity, bounded in entries; and by digest while anything
/// holds them.
#[derive(Default)]
pub struct ContentCache {
    contents: HashMap<ContentKey, Arc<Content>>,
    order: VecDeque<ContentKey>,
    /// Parsed contents by their digest, while anything holds them: a file rewritten with
    /// the same bytes (a new inode each time) shares one parse instead of caching another
    /// copy per rewrite. Pruned of the dead when it outgrows the cache twice over.
    by_digest: HashMap<(bool, [u8; 32]), Weak<Content>>,
    max: usize,
    pub hits: u64,
    pub evicted: u64,
}

impl ContentCache {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn len(&self) -> usize {
        self.contents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    /// The content of the file `identity` names, if it was read already.
    pub fn get(&mut self, identity: &FileIdentity) -> Option<Arc<Content>> {
        let hit = self.contents.get(&ContentKey::from(identity)).cloned();
        if hit.is_some() {
            self.hits += 1;
        }
        hit
    }

    /// A content with this digest that something still holds.
    pub fn with_digest(&self, digest: &Digest) -> Option<Arc<Content>> {
        self.by_digest.get(&digest.index()?).and_then(Weak::upgrade)
    }

    /// Caches `content` as what `identity` holds.
    pub fn insert(&mut self, identity: &FileIdentity, content: Arc<Content>) {
        if let Some(index) = content.digest.index() {
            self.by_digest.insert(index, Arc::downgrade(&content));
            if self.by_digest.len() > 2 * self.max.max(64) {
                self.by_digest.retain(|_, c| c.strong_count() > 0);
            }
        }
        let key = ContentKey::from(identity);
        if self.contents.insert(key, content).is_none() {
            self.order.push_back(key);
        }
        while self.contents.len() > self.max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.contents.remove(&old).is_some() {
                self.evicted += 1;
            }
        }
    }

    /// Drops contents only the cache holds, oldest first, until `enough` says so; each
    /// is counted as evicted. What a version or a read still holds stays.
    pub fn shed(&mut self, mut enough: impl FnMut() -> bool) {
        let mut kept = VecDeque::with_capacity(self.order.len());
        while let Some(key) = self.order.pop_front() {
            if enough() {
                kept.push_back(key);
                kept.extend(self.order.drain(..));
                break;
            }
            match self.contents.get(&key) {
                // One reference: the cache's own (a content two keys share has two).
                Some(c) if Arc::strong_count(c) == 1 => {
                    self.contents.remove(&key);
                    self.evicted += 1;
                }
                Some(_) => kept.push_back(key),
                None => {}
            }
        }
        self.order = kept;
    }

    /// Drops cached contents nothing outside the cache holds any more. The cache spares
    /// re-reading a file another root shares while it is in use; one that only the cache
    /// remembers (its versions aged out of every history) would otherwise stay until the
    /// cache is full, each a parsed bundle.
    pub fn prune(&mut self) {
        // Several keys (rewrites of the same bytes) may share one content: only references
        // from outside the cache keep it.
        let mut cached: HashMap<*const Content, usize> = HashMap::new();
        for c in self.contents.values() {
            *cached.entry(Arc::as_ptr(c)).or_default() += 1;
        }
        self.contents.retain(|_, c| {
            Arc::strong_count(c) > cached.get(&Arc::as_ptr(c)).copied().unwrap_or(0)
        });
        let contents = &self.contents;
        self.order.retain(|k| contents.contains_key(k));
        self.by_digest.retain(|_, c| c.strong_count() > 0);
    }
}
