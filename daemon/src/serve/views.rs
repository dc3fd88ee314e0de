//! The published state: what `GET /processes` serves, built from the ledger and the
//! verdicts. Field names here are the API's schema.

use std::{sync::Arc, time::SystemTime};

use serde::{Serialize, Serializer, ser::SerializeStruct};

use crate::{
    events::clock,
    judge::renewal::Match,
    judge::verdict::{Expiring, FileVerdict, ProcessVerdict, TrustKind, Verdict},
    ledger::{Origin, ProcessEntry, TrustRead},
    process::attribution::Attribution,
    stores::catalog::{Content, FileKey, Version},
    stores::formats::CertInfo,
};

/// A time as the API writes it (RFC 3339, milliseconds, UTC), kept as a time until it is
/// served: ten thousand processes' views would otherwise hold a hundred thousand strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(pub SystemTime);

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

fn stamp(t: SystemTime) -> Stamp {
    Stamp(t)
}

/// A certificate as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CertView {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub sha256: String,
    pub not_before: String,
    pub not_after: String,
    pub is_ca: bool,
}

fn unix(secs: i64) -> String {
    if secs < 0 {
        return "1970-01-01T00:00:00.000Z".into();
    }
    clock::rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
}

impl From<&CertInfo> for CertView {
    fn from(c: &CertInfo) -> Self {
        Self {
            subject: c.subject.clone(),
            issuer: c.issuer.clone(),
            serial: c.serial.clone(),
            sha256: c.sha256.clone(),
            not_before: unix(c.not_before),
            not_after: unix(c.not_after),
            is_ca: c.is_ca,
        }
    }
}

/// Certificates as the API shows them, written when served: views share the catalog's
/// parsed certificates instead of holding a copy of each as text (a process that read
/// many large bundles, all changed, would otherwise hold them all twice).
#[derive(Clone, Debug, Default)]
pub struct CertList(pub Vec<Arc<CertInfo>>);

impl CertList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl Serialize for CertList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|c| CertView::from(c.as_ref())))
    }
}

fn certs(list: &[Arc<CertInfo>]) -> CertList {
    CertList(list.to_vec())
}

/// A certificate the process holds in memory, gone from disk, whose renewal is on disk:
/// what `explain` words as "holds a certificate that expires in 1d 23h; a renewed one is
/// on disk since …", and what the expiry-ahead gauge is made of.
#[derive(Clone, Debug, Serialize)]
pub struct ExpiringView {
    /// The one it holds.
    pub certificate: CertView,
    pub renewed_by: RenewalView,
    /// The held certificate's notAfter, in unix seconds, for the metrics.
    #[serde(skip)]
    pub not_after: i64,
}

/// The renewal on disk of a held certificate.
#[derive(Clone, Debug, Serialize)]
pub struct RenewalView {
    #[serde(flatten)]
    pub certificate: CertView,
    /// `same_key` (same subject and key) or `same_issuer` (same subject and issuer, a new
    /// key).
    pub matched_by: Match,
    /// When a renewal of the held certificate first appeared on disk after the process
    /// read it.
    pub on_disk_since: Stamp,
}

impl From<&Expiring> for ExpiringView {
    fn from(e: &Expiring) -> Self {
        Self {
            certificate: CertView::from(e.held.as_ref()),
            renewed_by: RenewalView {
                certificate: CertView::from(e.renewal.as_ref()),
                matched_by: e.matched,
                on_disk_since: stamp(e.renewed_at),
            },
            not_after: e.held.not_after,
        }
    }
}

/// One version of a file, summarised. It shares the catalog's version rather than copying
/// it: every process that read one version points at the same one, and the summary is
/// written when served.
#[derive(Clone, Debug)]
pub struct VersionView {
    version: Arc<Version>,
    /// Counted once here: counting walks every certificate.
    certificates: usize,
}

impl VersionView {
    pub fn new(version: &Arc<Version>) -> Self {
        Self {
            certificates: version
                .content
                .as_deref()
                .map_or(0, |c| c.certificates().len()),
            version: Arc::clone(version),
        }
    }
}

impl Serialize for VersionView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = &self.version;
        let content: Option<&Content> = v.content.as_deref();
        let mut out = s.serialize_struct("VersionView", 7)?;
        // SHA-256 of the content (for a directory: of its entries' names and hashes), for
        // certificates only: a key or any other secret is never fingerprinted in the open.
        out.serialize_field("sha256", &content.and_then(Content::sha256_hex))?;
        // The file's change counter: a new version is a new revision.
        out.serialize_field("revision", &v.id)?;
        out.serialize_field("size", &content.map(|c| c.size))?;
        // When this content became what the path names.
        out.serialize_field("since", &Stamp(v.seen_at))?;
        out.serialize_field(
            "format",
            match content {
                Some(c) => c.kind_name(),
                None if v.unseen => "unseen",
                None => "absent",
            },
        )?;
        out.serialize_field("certificates", &self.certificates)?;
        out.serialize_field("errors", &content.map(Content::errors).unwrap_or_default())?;
        out.end()
    }
}

/// One trust store (a file or directory as one root sees it) for `GET /stores`.
#[derive(Clone, Debug, Serialize)]
pub struct StoreView {
    pub path: String,
    /// `host`, or the root's identity (mount namespace and root inode).
    pub root: String,
    /// Processes (live or recently exited) that read it.
    pub readers: usize,
    pub current: Option<VersionView>,
    pub certificates: CertList,
    /// Every version kept, oldest first.
    pub versions: Vec<VersionView>,
}

pub fn store_view(
    key: &FileKey,
    versions: &std::collections::VecDeque<Arc<Version>>,
    readers: usize,
    host: bool,
) -> StoreView {
    let current = versions.back();
    StoreView {
        path: key.path.to_string_lossy().into_owned(),
        root: if host {
            "host".into()
        } else {
            key.root.to_string()
        },
        readers,
        current: current.map(VersionView::new),
        certificates: CertList(
            current
                .and_then(|v| v.content.as_deref())
                .map(|c| c.certificates().into_values().collect())
                .unwrap_or_default(),
        ),
        versions: versions.iter().map(VersionView::new).collect(),
    }
}

/// One trust file as one process read it, and the verdict on it.
#[derive(Clone, Debug, Serialize)]
pub struct FileView {
    /// The path exactly as the process wrote it.
    pub path: String,
    /// Where it led in the process's root when the process read it.
    pub resolved: Option<String>,
    pub kind: TrustKind,
    pub verdict: Verdict,
    pub stale_since: Option<Stamp>,
    pub first_open: Stamp,
    pub last_open: Stamp,
    pub last_read: Option<Stamp>,
    pub bytes_read: u64,
    pub opens: u64,
    pub reads: u64,
    pub listed: bool,
    /// The version the process read, and when it read it.
    pub read_version: Option<VersionView>,
    pub read_at: Stamp,
    /// What is on disk now.
    pub current_version: Option<VersionView>,
    pub missing_cas: CertList,
    pub removed_cas_trusted: CertList,
    /// CAs removed from disk it still holds, expired: listed, no exposure.
    pub removed_cas_expired: CertList,
    /// Certificates it holds that are gone from disk while their renewal is there,
    /// expired or not, earliest expiry first.
    pub expiring_in_memory: Vec<ExpiringView>,
    /// Those of them past their notAfter: TLS with this process fails now.
    pub expired_in_memory: CertList,
    pub note: Option<String>,
}

fn file_view(read: &TrustRead, v: &FileVerdict) -> FileView {
    FileView {
        path: read.path.to_string_lossy().into_owned(),
        resolved: read
            .resolved
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        kind: v.kind,
        verdict: v.verdict,
        stale_since: v.stale_since.map(stamp),
        first_open: stamp(read.first_open),
        last_open: stamp(read.last_open),
        last_read: read.last_read.map(stamp),
        bytes_read: read.bytes,
        opens: read.opens,
        reads: read.reads,
        listed: read.listed,
        read_version: read.version.as_ref().map(VersionView::new),
        read_at: stamp(read.version_read_at),
        current_version: v.current.as_ref().map(VersionView::new),
        missing_cas: certs(&v.missing_cas),
        removed_cas_trusted: certs(&v.removed_cas_trusted),
        removed_cas_expired: certs(&v.removed_cas_expired),
        expiring_in_memory: v.expiring.iter().map(ExpiringView::from).collect(),
        expired_in_memory: certs(&v.expired_in_memory),
        note: v.note.clone().or_else(|| read.resolve_error.clone()),
    }
}

/// Whether a verdict rests on observed reads or on inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Observed,
    Unverified,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub start_time: Option<Stamp>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: u32,
    #[serde(flatten)]
    pub attribution: Attribution,
    pub origin: Origin,
    pub confidence: Confidence,
    pub verdict: Verdict,
    pub stale_since: Option<Stamp>,
    /// Why a TLS-capable process is listed as unverified.
    pub tls_library: Option<String>,
    pub exited_at: Option<Stamp>,
    pub files: Vec<FileView>,
}

pub fn process_view(p: &ProcessEntry, v: &ProcessVerdict) -> ProcessView {
    ProcessView {
        pid: p.key.pid,
        start_time: p.info.start_time.map(stamp),
        comm: p.info.comm.clone(),
        exe: p.info.exe.clone(),
        cmdline: p.info.cmdline.clone(),
        uid: p.info.uid,
        attribution: p.info.attribution.clone(),
        origin: p.origin,
        confidence: if v.verdict == Verdict::Unverified {
            Confidence::Unverified
        } else {
            Confidence::Observed
        },
        verdict: v.verdict,
        stale_since: v.stale_since.map(stamp),
        tls_library: p.info.tls_library.clone(),
        exited_at: p.exited_at.map(stamp),
        files: p
            .reads
            .iter()
            .zip(&v.files)
            .map(|(r, f)| file_view(r, f))
            .collect(),
    }
}
