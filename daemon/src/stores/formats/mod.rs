//! What one trust file holds: the certificates of a PEM bundle, a DER certificate, a Java
//! keystore (JKS, JCEKS) or a PKCS#12 store, told apart by content because trust files
//! are named by convention only (`cacerts` is JKS or PKCS#12, `.crt` is PEM or DER).
//!
//! Private keys are recognised by their PEM label and never decoded: what this module
//! returns is stored and reported, and key material must not reach either.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Display;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::{self, Any, Class, FromBer, FromDer, Header, Length, Oid, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::X509Version;

/// What a trust file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentKind {
    PemBundle,
    DerCertificate,
    Jks,
    Pkcs12,
    PrivateKey,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// x509-parser's Display of the subject (RFC 4514-like).
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex, no separators, no leading "0x".
    pub serial: String,
    /// Lowercase hex SHA-256 of the certificate's DER.
    pub sha256: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// basicConstraints CA=true, or a v1 self-signed certificate (old roots predate
    /// extensions and are trusted as CAs all the same).
    pub is_ca: bool,
    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo: the key, whoever signed it.
    /// A renewal that kept its key has the same one. Empty in state files written before
    /// it was recorded (it is then never taken as a match).
    #[serde(default)]
    pub spki_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub kind: ContentKind,
    /// The content holds (or may hold, where it cannot be read without a password) key
    /// material: a private or secret key. Such content is never fingerprinted in the
    /// open (see `stores::digest`).
    pub secret: bool,
    /// In file order; a certificate seen twice (same sha256) is kept once.
    pub certs: Vec<CertInfo>,
    /// One human-readable line per problem; never any key material.
    pub errors: Vec<String>,
    /// Certificates past the cap, not read.
    pub certs_dropped: usize,
}

/// A file full of broken blocks would otherwise yield an error line per block, up to
/// hundreds of thousands for a 16 MiB input.
pub const MAX_ERRORS: usize = 64;

/// Certificates read from one file by default (`catalog.max_certificates_per_file`): the
/// largest real bundles hold a few hundred; a 16 MiB file of minimal certificates holds
/// some 50,000, and each parsed one costs the daemon about half a kilobyte.
pub const MAX_CERTIFICATES: usize = 4096;

/// Reads the certificates in one trust file's content, at most [`MAX_CERTIFICATES`].
/// Never panics, whatever the bytes.
pub fn parse(bytes: &[u8]) -> Parsed {
    parse_capped(bytes, MAX_CERTIFICATES)
}

/// Reads at most `max_certs` certificates of one trust file's content; the rest are
/// counted in `Parsed::certs_dropped`, not decoded. Never panics, whatever the bytes.
pub fn parse_capped(bytes: &[u8], max_certs: usize) -> Parsed {
    let mut col = Collector {
        max_certs,
        ..Collector::default()
    };
    let kind = sniff_and_read(bytes, &mut col);
    col.finish(kind)
}

fn sniff_and_read(bytes: &[u8], col: &mut Collector) -> ContentKind {
    if let Some(flavour) = jks::flavour(bytes) {
        jks::read(bytes, flavour, col);
        return ContentKind::Jks;
    }
    if pkcs12::looks_like(bytes) {
        pkcs12::read(bytes, col);
        return ContentKind::Pkcs12;
    }
    let der_shaped = looks_like_der_certificate(bytes);
    let der_cert = if der_shaped {
        X509Certificate::from_der(bytes).ok()
    } else {
        None
    };
    if let Some((rest, cert)) = der_cert {
        col.next_ordinal();
        col.add_parsed(&cert);
        if !rest.is_empty() {
            col.error(format!(
                "DER file: {} bytes after the certificate ignored",
                rest.len()
            ));
        }
        return ContentKind::DerCertificate;
    }
    if let Some(kind) = pem::read(bytes, col) {
        return kind;
    }
    // A DER CRL has the same outer shape as a certificate; CRLs are skipped, not errors.
    if der_shaped && CertificateRevocationList::from_der(bytes).is_err() {
        let n = col.next_ordinal();
        col.add_certificate(n, bytes, "DER file");
        return ContentKind::DerCertificate;
    }
    ContentKind::Unknown
}

/// A certificate is SEQUENCE { tbsCertificate SEQUENCE, … }; keys (SEQUENCE { INTEGER … })
/// and text do not start that way. The outer length may exceed the input, so that a
/// truncated certificate is still reported as one.
fn looks_like_der_certificate(bytes: &[u8]) -> bool {
    let Some((rest, outer)) = der_header(bytes) else {
        return false;
    };
    let Some((inner_rest, inner)) = der_header(rest) else {
        return false;
    };
    let inner_header_len = rest.len() - inner_rest.len();
    matches!(
        (outer.length(), inner.length()),
        (Length::Definite(o), Length::Definite(i)) if is_sequence(&outer) && is_sequence(&inner)
            && i.saturating_add(inner_header_len) <= o
    )
}

fn der_header(bytes: &[u8]) -> Option<(&[u8], Header<'_>)> {
    Header::from_der(bytes).ok()
}

fn is_sequence(h: &Header) -> bool {
    h.class() == Class::Universal && h.tag() == Tag::Sequence && h.is_constructed()
}

/// Gathers certificates and problems across one file, numbering certificates in file
/// order (unreadable ones included) so that "certificate 3" matches a reader's count.
#[derive(Default)]
struct Collector {
    certs: Vec<CertInfo>,
    /// Key material seen, or content that may hold it and could not be read.
    secret: bool,
    seen: HashSet<[u8; 32]>,
    errors: Vec<String>,
    suppressed: usize,
    ordinal: usize,
    max_certs: usize,
    /// Certificates past `max_certs`, skipped.
    dropped: usize,
}

impl Collector {
    fn next_ordinal(&mut self) -> usize {
        self.ordinal += 1;
        self.ordinal
    }

    /// Whether the cap is reached: further certificates are counted, not decoded.
    fn full(&mut self) -> bool {
        let full = self.certs.len() >= self.max_certs;
        if full {
            self.dropped += 1;
        }
        full
    }

    /// A certificate block begins: its ordinal, or `None` when the cap is reached (the
    /// block is then skipped and counted).
    fn begin_certificate(&mut self) -> Option<usize> {
        let n = self.next_ordinal();
        (!self.full()).then_some(n)
    }

    fn error(&mut self, line: String) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(line);
        } else {
            self.suppressed += 1;
        }
    }

    fn cert_error(&mut self, n: usize, whence: impl Display, problem: impl Display) {
        self.error(format!("certificate {n} ({whence}): {problem}"));
    }

    /// Trailing bytes after the certificate are accepted: in OpenSSL's TRUSTED
    /// CERTIFICATE they are the trust settings.
    fn add_certificate(&mut self, n: usize, der: &[u8], whence: impl Display) {
        if self.full() {
            return;
        }
        match X509Certificate::from_der(der) {
            Ok((_, cert)) => self.add_parsed(&cert),
            Err(e) => self.cert_error(n, whence, format!("malformed: {}", x509_problem(&e))),
        }
    }

    fn add_parsed(&mut self, cert: &X509Certificate<'_>) {
        if self.full() {
            return;
        }
        let digest: [u8; 32] = Sha256::digest(cert.as_raw()).into();
        if self.seen.insert(digest) {
            self.certs.push(cert_info(cert, &digest));
        }
    }

    fn finish(mut self, kind: ContentKind) -> Parsed {
        if self.suppressed > 0 {
            self.errors
                .push(format!("{} further problems not listed", self.suppressed));
        }
        if self.dropped > 0 {
            self.errors.push(format!(
                "more than {} certificates: {} more not read \
                 (catalog.max_certificates_per_file)",
                self.max_certs, self.dropped
            ));
        }
        Parsed {
            kind,
            secret: self.secret,
            certs: self.certs,
            errors: self.errors,
            certs_dropped: self.dropped,
        }
    }
}

fn cert_info(cert: &X509Certificate<'_>, digest: &[u8; 32]) -> CertInfo {
    let self_issued = cert.subject().as_raw() == cert.issuer().as_raw();
    let is_ca = match cert.basic_constraints() {
        Ok(Some(bc)) => bc.value.ca,
        Ok(None) => cert.version() == X509Version::V1 && self_issued,
        // A duplicated basicConstraints extension: no CA claim can be trusted.
        Err(_) => false,
    };
    CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: serial_hex(cert.raw_serial()),
        sha256: hex(digest),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
        spki_sha256: hex(&Sha256::digest(cert.public_key().raw)),
    }
}

/// As `openssl x509 -serial` prints it: DER's leading sign octet dropped. Negative serials
/// (a few pre-RFC 5280 certificates) stay in two's complement, where openssl prints a
/// minus sign and the magnitude.
fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex(raw.get(first..).unwrap_or_default())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn x509_problem(e: &x509_parser::nom::Err<X509Error>) -> String {
    match e {
        x509_parser::nom::Err::Incomplete(_) => "truncated".to_owned(),
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e.to_string(),
    }
}

/// Names, labels and aliases come from the file: quoted, control characters escaped, and
/// cut short so that one error stays one short line.
fn quoted(bytes: &[u8]) -> String {
    const MAX_CHARS: usize = 64;
    let text = String::from_utf8_lossy(bytes);
    let mut cut: String = text.chars().take(MAX_CHARS).collect();
    if text.chars().nth(MAX_CHARS).is_some() {
        cut.push('…');
    }
    format!("{cut:?}")
}

mod jks;
mod pem;
mod pkcs12;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The daemon crate's fixtures; STORE_FORMAT_FIXTURES points elsewhere when this file
    /// is compiled by another crate.
    fn fixture_path(name: &str) -> PathBuf {
        let dir = std::env::var_os("STORE_FORMAT_FIXTURES").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store_format"),
            PathBuf::from,
        );
        dir.join(name)
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = fixture_path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    // `openssl x509 -in ca.pem -noout -fingerprint -sha256`, lowercased, colons removed.
    const CA_SHA256: &str = "ad375889d790ce8f15253138a737ebdcda08bbae6b427ae61171b5db46ea2e30";
    // `openssl x509 -in leaf.pem -noout -fingerprint -sha256`, lowercased, colons removed.
    const LEAF_SHA256: &str = "be5b5af6f6d3dd23a9741901e5bdcd34e69ac8a49b1721ee2d68e8f0d57fb4b6";
    // `openssl x509 -in v1-root.pem -noout -fingerprint -sha256`, lowercased, colons removed.
    const V1_SHA256: &str = "6ef4d49f6a6898865f80da833e75b4cec1d9ce0e42654ea2842f324e578c9b98";
    // `keytool -list -v -keystore test-only-throwaway-keypair.jks -storepass changeit`,
    // "SHA256:" line, lowercased, colons removed.
    const KEYPAIR_SHA256: &str = "421c21063d498b284cfff4487acaf635fc7b5782800a45008c57c42d9d07f557";

    fn shas(parsed: &Parsed) -> Vec<&str> {
        parsed.certs.iter().map(|c| c.sha256.as_str()).collect()
    }

    #[test]
    fn pem_bundle_of_ca_and_leaf() {
        let bundle = concat(&[
            b"# trustdrift test CA\n",
            &fixture("ca.pem"),
            b"\nsome text between blocks\n\n",
            &fixture("leaf.pem"),
            b"trailing text\n",
        ]);
        let parsed = parse(&bundle);
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert_eq!(parsed.errors, Vec::<String>::new());
        assert_eq!(parsed.certs.len(), 2);
        assert!(!parsed.secret, "certificates alone are public");
        let (ca, leaf) = (&parsed.certs[0], &parsed.certs[1]);

        assert_eq!(ca.sha256, CA_SHA256);
        // `openssl x509 -noout -serial` printed serial=7D1C2B3A4F5E6D01.
        assert_eq!(ca.serial, "7d1c2b3a4f5e6d01");
        // `date -u -d "$(openssl x509 -noout -enddate | cut -d= -f2)" +%s` (Oct 30 17:55:16 2126 GMT).
        assert_eq!(ca.not_after, 4_949_056_516);
        assert_eq!(ca.subject, "O=trustdrift, CN=trustdrift test CA");
        assert_eq!(ca.issuer, ca.subject);
        assert!(ca.is_ca);

        assert_eq!(leaf.sha256, LEAF_SHA256);
        // serial=C0FFEE (set with -set_serial 0x00c0ffee: the leading zero is not kept).
        assert_eq!(leaf.serial, "c0ffee");
        // notAfter=Nov 20 17:55:16 2036 GMT, notBefore=Nov 23 17:55:16 2026 GMT.
        assert_eq!(leaf.not_after, 2_110_816_516);
        assert_eq!(leaf.not_before, 1_795_456_516);
        assert_eq!(leaf.subject, "O=trustdrift, CN=leaf.trustdrift.test");
        assert_eq!(leaf.issuer, ca.subject);
        assert!(!leaf.is_ca);

        // `openssl x509 -noout -pubkey | openssl pkey -pubin -outform DER | openssl dgst -sha256`.
        assert_eq!(
            ca.spki_sha256,
            "258186d23fad46faae119d898eba4268115ac1f07114564059c2daa37742bbee"
        );
        assert_eq!(
            leaf.spki_sha256,
            "e0d65e7b4814e5c43524a8857506a94ea731b1e46f392730676011a082b1efaf"
        );
    }

    #[test]
    fn a_state_file_certificate_without_a_key_fingerprint_still_reads() {
        let old = r#"{"subject":"CN=a","issuer":"CN=a","serial":"01","sha256":"00",
                      "not_before":0,"not_after":1,"is_ca":true}"#;
        let c: CertInfo = serde_json::from_str(old).unwrap();
        assert_eq!(c.spki_sha256, "");
    }

    #[test]
    fn duplicate_certificates_are_kept_once() {
        let ca = fixture("ca.pem");
        let parsed = parse(&concat(&[&ca, &fixture("leaf.pem"), &ca]));
        assert_eq!(shas(&parsed), [CA_SHA256, LEAF_SHA256]);
        assert!(parsed.errors.is_empty());
    }

    #[test]
    fn past_the_certificate_cap_the_rest_is_counted_not_read_and_a_key_still_makes_it_secret() {
        let bundle = concat(&[
            &fixture("ca.pem"),
            &fixture("leaf.pem"),
            &fixture("v1-root.pem"),
            &fixture("test-only-throwaway.key"),
        ]);
        let parsed = parse_capped(&bundle, 1);
        assert_eq!(shas(&parsed), [CA_SHA256]);
        assert_eq!(parsed.certs_dropped, 2);
        assert!(parsed.secret, "the key after the cap is still seen");
        assert_eq!(
            parsed.errors,
            ["more than 1 certificates: 2 more not read (catalog.max_certificates_per_file)"]
        );
        // The same cap on the other formats' paths (a DER file).
        let der = parse_capped(&fixture("ca.der"), 0);
        assert!(der.certs.is_empty() && der.certs_dropped == 1, "{der:?}");
        assert_eq!(parse(&bundle).certs_dropped, 0);
    }

    #[test]
    fn v1_self_signed_root_counts_as_ca() {
        let parsed = parse(&fixture("v1-root.pem"));
        assert_eq!(shas(&parsed), [V1_SHA256]);
        assert_eq!(parsed.certs[0].serial, "01");
        assert!(parsed.certs[0].is_ca);
    }

    #[test]
    fn system_bundle() {
        let path = "/etc/ssl/certs/ca-certificates.crt";
        let Ok(bytes) = std::fs::read(path) else {
            eprintln!("{path} absent: skipped");
            return;
        };
        let parsed = parse(&bytes);
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert_eq!(parsed.errors, Vec::<String>::new());
        assert!(
            parsed.certs.len() > 100,
            "{} certificates",
            parsed.certs.len()
        );
        let not_ca: Vec<_> = parsed.certs.iter().filter(|c| !c.is_ca).collect();
        assert!(not_ca.is_empty(), "{not_ca:#?}");
    }

    #[test]
    fn system_java_cacerts() {
        let path = "/etc/ssl/certs/java/cacerts";
        let Ok(bytes) = std::fs::read(path) else {
            eprintln!("{path} absent: skipped");
            return;
        };
        let parsed = parse(&bytes);
        assert!(matches!(
            parsed.kind,
            ContentKind::Jks | ContentKind::Pkcs12
        ));
        assert_eq!(parsed.errors, Vec::<String>::new());
        assert!(
            parsed.certs.len() > 100,
            "{} certificates",
            parsed.certs.len()
        );
        assert!(parsed.certs.iter().all(|c| c.is_ca));
    }

    /// Replaces the first occurrence of `from` in `bytes`.
    fn replace_once(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        concat(&[&bytes[..at], to, &bytes[at + from.len()..]])
    }

    fn without_end_line(pem: &[u8]) -> Vec<u8> {
        let text = std::str::from_utf8(pem).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("-----END "))
            .collect();
        format!("{}\n", kept.join("\n")).into_bytes()
    }

    #[test]
    fn corrupted_and_truncated_blocks_are_reported_and_the_rest_read() {
        let leaf = fixture("leaf.pem");
        // The leaf's second line, broken with a character base64 does not have.
        let second_line: Vec<u8> = leaf.split(|&b| b == b'\n').nth(1).unwrap().to_vec();
        let mut broken_line = second_line.clone();
        broken_line[10] = b'!';
        let corrupted_leaf = replace_once(&leaf, &second_line, &broken_line);
        let bundle = concat(&[
            &fixture("ca.pem"),
            &corrupted_leaf,
            &fixture("v1-root.pem"),
            &without_end_line(&leaf),
        ]);
        let parsed = parse(&bundle);
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert_eq!(shas(&parsed), [CA_SHA256, V1_SHA256]);
        let ca_lines = fixture("ca.pem").split(|&b| b == b'\n').count() - 1;
        let leaf_lines = leaf.split(|&b| b == b'\n').count() - 1;
        let v1_lines = fixture("v1-root.pem").split(|&b| b == b'\n').count() - 1;
        let leaf_begin = ca_lines + 1;
        let truncated_begin = ca_lines + leaf_lines + v1_lines + 1;
        assert_eq!(
            parsed.errors,
            [
                format!(
                    "certificate 2 (PEM block at line {leaf_begin}): bad base64 at line {}",
                    leaf_begin + 1
                ),
                format!("certificate 4 (PEM block at line {truncated_begin}): no END line"),
            ]
        );
    }

    #[test]
    fn block_with_bad_der_is_reported() {
        // Valid base64 of bytes that are no certificate.
        let bundle = concat(&[
            b"-----BEGIN CERTIFICATE-----\nMIIBAgMEBQ==\n-----END CERTIFICATE-----\n",
            &fixture("leaf.pem"),
        ]);
        let parsed = parse(&bundle);
        assert_eq!(shas(&parsed), [LEAF_SHA256]);
        assert_eq!(parsed.errors.len(), 1);
        assert!(
            parsed.errors[0].starts_with("certificate 1 (PEM block at line 1): malformed: "),
            "{:?}",
            parsed.errors
        );
    }

    #[test]
    fn mismatched_end_line_is_reported() {
        let ca = fixture("ca.pem");
        let bad = replace_once(&ca, b"-----END CERTIFICATE-----", b"-----END X509 CRL-----");
        let parsed = parse(&concat(&[&bad, &fixture("leaf.pem")]));
        assert_eq!(shas(&parsed), [LEAF_SHA256]);
        assert_eq!(
            parsed.errors,
            [format!(
                "certificate 1 (PEM block at line 1): ends with END \"X509 CRL\" at line {}",
                ca.split(|&b| b == b'\n').count() - 1
            )]
        );
    }

    #[test]
    fn trusted_certificate_block() {
        let parsed = parse(&fixture("ca-trusted.pem"));
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(shas(&parsed), [CA_SHA256]);
        assert!(parsed.certs[0].is_ca);
    }

    #[test]
    fn crlf_line_endings() {
        let lf = concat(&[&fixture("ca.pem"), &fixture("leaf.pem")]);
        let crlf = String::from_utf8(lf.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        let parsed = parse(&crlf);
        assert_eq!(parsed, parse(&lf));
        assert_eq!(shas(&parsed), [CA_SHA256, LEAF_SHA256]);
        assert!(parsed.errors.is_empty());
    }

    #[test]
    fn crl_blocks_are_skipped_silently() {
        let crl = fixture("ca.crl.pem");
        let parsed = parse(&concat(&[&crl, b"\n", &fixture("leaf.pem")]));
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert_eq!(shas(&parsed), [LEAF_SHA256]);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);

        let only_crl = parse(&crl);
        assert_eq!(only_crl.kind, ContentKind::PemBundle);
        assert!(only_crl.certs.is_empty() && only_crl.errors.is_empty());
    }

    /// Every base64 line of a key file, to check that none reaches an error.
    fn key_body_lines(key: &[u8]) -> Vec<String> {
        std::str::from_utf8(key)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn key_only_pem_is_a_private_key() {
        // PKCS#8 "PRIVATE KEY" then the same throwaway key as "EC PRIVATE KEY".
        let key = fixture("test-only-throwaway.key");
        let parsed = parse(&key);
        assert_eq!(
            parsed,
            Parsed {
                kind: ContentKind::PrivateKey,
                secret: true,
                certs: vec![],
                errors: vec![],
                certs_dropped: 0,
            }
        );
        for label in [
            "RSA PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
        ] {
            let relabelled = String::from_utf8(key.clone())
                .unwrap()
                .replace("EC PRIVATE KEY", label);
            assert_eq!(parse(relabelled.as_bytes()).kind, ContentKind::PrivateKey);
        }
    }

    #[test]
    fn broken_key_blocks_never_leak_key_material() {
        let key = fixture("test-only-throwaway.key");
        let body = key_body_lines(&key);
        let broken = without_end_line(&key);
        let mismatched = replace_once(&key, b"-----END PRIVATE KEY-----", b"-----END FOO-----");
        for input in [
            broken,
            mismatched,
            concat(&[&fixture("leaf.pem"), &without_end_line(&key)]),
        ] {
            let parsed = parse(&input);
            assert!(!parsed.errors.is_empty());
            for error in &parsed.errors {
                for line in &body {
                    for window in line.as_bytes().windows(8) {
                        let window = std::str::from_utf8(window).unwrap();
                        assert!(
                            !error.contains(window),
                            "{error:?} holds key bytes {window:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn certificate_and_key_pem_is_a_bundle() {
        let parsed = parse(&concat(&[
            &fixture("leaf.pem"),
            &fixture("test-only-throwaway.key"),
        ]));
        assert_eq!(parsed.kind, ContentKind::PemBundle);
        assert_eq!(shas(&parsed), [LEAF_SHA256]);
        assert!(parsed.errors.is_empty());
        assert!(
            parsed.secret,
            "a key beside the certificate is key material"
        );
    }

    #[test]
    fn jks_trusted_certificates() {
        let parsed = parse(&fixture("trusted-certs.jks"));
        assert_eq!(parsed.kind, ContentKind::Jks);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert!(!parsed.secret);
        // Java writes entries in its hash table's order, not import order.
        let mut got = shas(&parsed);
        got.sort_unstable();
        assert_eq!(got, [V1_SHA256, CA_SHA256]);
        assert!(parsed.certs.iter().all(|c| c.is_ca));
    }

    #[test]
    fn jks_private_key_entry_yields_its_chain() {
        let parsed = parse(&fixture("test-only-throwaway-keypair.jks"));
        assert_eq!(parsed.kind, ContentKind::Jks);
        assert!(parsed.secret, "a private-key entry is key material");
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(shas(&parsed), [KEYPAIR_SHA256]);
        // keytool -list -v: "Serial number: 1590c98ab7fd5779".
        assert_eq!(parsed.certs[0].serial, "1590c98ab7fd5779");
        assert_eq!(
            parsed.certs[0].subject,
            // keytool's -dname is RFC 2253, most significant RDN last.
            "CN=trustdrift test keypair, O=trustdrift"
        );
    }

    /// Every prefix of a keystore: no panic, the certificates read are a prefix of the
    /// whole store's, and an error is reported unless only the trailing hash is missing.
    fn check_every_prefix(name: &str, hash_len: usize) {
        let full_bytes = fixture(name);
        let full = parse(&full_bytes);
        assert!(full.errors.is_empty());
        let mut last = 0;
        for len in 0..=full_bytes.len() {
            let parsed = parse(&full_bytes[..len]);
            assert!(
                parsed.certs.len() >= last,
                "{name}[..{len}] lost certificates"
            );
            last = parsed.certs.len();
            assert_eq!(parsed.certs[..], full.certs[..parsed.certs.len()]);
            if len < 4 {
                assert_eq!(parsed.kind, ContentKind::Unknown, "{name}[..{len}]");
            } else {
                assert_eq!(parsed.kind, full.kind, "{name}[..{len}]");
                let complete = len + hash_len >= full_bytes.len();
                assert_eq!(
                    parsed.errors.is_empty(),
                    complete,
                    "{name}[..{len}]: {:?}",
                    parsed.errors
                );
            }
        }
        assert_eq!(last, full.certs.len());
    }

    #[test]
    fn jks_truncated_at_every_offset() {
        // The keystore ends with a 20-byte SHA-1, which is ignored.
        check_every_prefix("trusted-certs.jks", 20);
        check_every_prefix("test-only-throwaway-keypair.jks", 20);
    }

    #[test]
    fn jks_truncated_inside_entry_reports_where() {
        let bytes = fixture("trusted-certs.jks");
        let parsed = parse(&bytes[..100]);
        assert_eq!(parsed.certs.len(), 0);
        assert_eq!(parsed.errors.len(), 1);
        assert!(
            parsed.errors[0].starts_with("JKS entry 1 of 2 (alias \"")
                && parsed.errors[0].contains("truncated: certificate at offset"),
            "{:?}",
            parsed.errors
        );
    }

    /// Offset of the first entry's certificate length in a v2 JKS with a trusted entry
    /// first: header, tag, alias, timestamp, type "X.509".
    fn first_cert_length_offset(jks: &[u8]) -> usize {
        let alias_len = usize::from(u16::from_be_bytes([jks[16], jks[17]]));
        let type_at = 18 + alias_len + 8;
        let type_len = usize::from(u16::from_be_bytes([jks[type_at], jks[type_at + 1]]));
        type_at + 2 + type_len
    }

    #[test]
    fn jks_lying_lengths() {
        let bytes = fixture("trusted-certs.jks");

        let mut huge_cert = bytes.clone();
        let at = first_cert_length_offset(&huge_cert);
        huge_cert[at..at + 4].copy_from_slice(&0xffff_fff0_u32.to_be_bytes());
        let parsed = parse(&huge_cert);
        assert_eq!(parsed.kind, ContentKind::Jks);
        assert!(parsed.certs.is_empty());
        assert_eq!(parsed.errors.len(), 1);
        assert!(
            parsed.errors[0].contains("needs 4294967280 bytes"),
            "{:?}",
            parsed.errors
        );

        let mut huge_count = bytes.clone();
        huge_count[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let parsed = parse(&huge_count);
        assert_eq!(parsed.certs.len(), 2);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);

        let mut huge_alias = bytes.clone();
        huge_alias[16..18].copy_from_slice(&u16::MAX.to_be_bytes());
        let parsed = parse(&huge_alias);
        assert!(parsed.certs.is_empty());
        assert!(
            parsed.errors[0].contains("truncated: alias"),
            "{:?}",
            parsed.errors
        );

        // The key entry's chain length: after the protected key's bytes.
        let keypair = fixture("test-only-throwaway-keypair.jks");
        let alias_len = usize::from(u16::from_be_bytes([keypair[16], keypair[17]]));
        let key_len_at = 18 + alias_len + 8;
        let key_len = u32::from_be_bytes(keypair[key_len_at..key_len_at + 4].try_into().unwrap());
        let chain_at = key_len_at + 4 + key_len as usize;
        let mut huge_chain = keypair.clone();
        huge_chain[chain_at..chain_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let parsed = parse(&huge_chain);
        assert_eq!(shas(&parsed), [KEYPAIR_SHA256]);
        assert_eq!(parsed.errors.len(), 1, "{:?}", parsed.errors);

        let mut huge_key = keypair;
        huge_key[key_len_at..key_len_at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let parsed = parse(&huge_key);
        assert!(parsed.certs.is_empty());
        assert!(
            parsed.errors[0].contains("protected key"),
            "{:?}",
            parsed.errors
        );

        let mut bad_version = bytes;
        bad_version[4..8].copy_from_slice(&7_u32.to_be_bytes());
        assert_eq!(parse(&bad_version).errors, ["JKS version 7 not supported"]);
    }

    #[test]
    fn pkcs12_unencrypted_certificates() {
        // keytool, as OpenJDK builds its PKCS#12 cacerts: no cert encryption, no MAC.
        let parsed = parse(&fixture("trusted-certs-unencrypted.p12"));
        assert_eq!(parsed.kind, ContentKind::Pkcs12);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut got = shas(&parsed);
        got.sort_unstable();
        assert_eq!(got, [CA_SHA256, LEAF_SHA256]);

        // openssl pkcs12 -export -nokeys -certpbe NONE -nomac.
        let parsed = parse(&fixture("openssl-nokeys-unencrypted.p12"));
        assert_eq!(parsed.kind, ContentKind::Pkcs12);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(shas(&parsed), [LEAF_SHA256, CA_SHA256]);
    }

    #[test]
    fn pkcs12_encrypted_needs_a_password() {
        let parsed = parse(&fixture("trusted-certs-encrypted.p12"));
        assert_eq!(parsed.kind, ContentKind::Pkcs12);
        assert!(parsed.certs.is_empty());
        assert_eq!(parsed.errors, [pkcs12::ENCRYPTED_SKIPPED]);
    }

    #[test]
    fn pkcs12_truncated_at_every_offset() {
        let bytes = fixture("trusted-certs-unencrypted.p12");
        for len in 0..bytes.len() {
            let parsed = parse(&bytes[..len]);
            if parsed.kind == ContentKind::Pkcs12 {
                assert!(!parsed.errors.is_empty(), "[..{len}]");
            }
        }
        let bytes = fixture("trusted-certs-encrypted.p12");
        for len in 0..bytes.len() {
            parse(&bytes[..len]);
        }
    }

    #[test]
    fn pkcs12_in_indefinite_length_ber() {
        // Re-encodes the unencrypted store's outer PFX, ContentInfo and [0] with
        // indefinite lengths, as some Windows and NSS exports do.
        let der = fixture("trusted-certs-unencrypted.p12");
        let (_, pfx) = Any::from_ber(&der).unwrap();
        let (rest, _version) = Any::from_ber(pfx.data).unwrap();
        let version_len = pfx.data.len() - rest.len();
        let (_, auth_safe) = Any::from_ber(rest).unwrap();
        let (rest, _oid) = Any::from_ber(auth_safe.data).unwrap();
        let oid_len = auth_safe.data.len() - rest.len();
        let (_, explicit) = Any::from_ber(rest).unwrap();
        let ber = concat(&[
            &[0x30, 0x80],
            &pfx.data[..version_len],
            &[0x30, 0x80],
            &auth_safe.data[..oid_len],
            &[0xa0, 0x80],
            explicit.data,
            &[0, 0, 0, 0, 0, 0],
        ]);
        let parsed = parse(&ber);
        assert_eq!(parsed.kind, ContentKind::Pkcs12);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.certs, parse(&der).certs);
    }

    #[test]
    fn pkcs12_oids() {
        for (raw, dotted) in [
            (pkcs12::OID_DATA, "1.2.840.113549.1.7.1"),
            (pkcs12::OID_SIGNED_DATA, "1.2.840.113549.1.7.2"),
            (pkcs12::OID_ENVELOPED_DATA, "1.2.840.113549.1.7.3"),
            (pkcs12::OID_ENCRYPTED_DATA, "1.2.840.113549.1.7.6"),
            (pkcs12::OID_CERT_BAG, "1.2.840.113549.1.12.10.1.3"),
            (pkcs12::OID_SAFE_CONTENTS_BAG, "1.2.840.113549.1.12.10.1.6"),
            (pkcs12::OID_X509_CERTIFICATE, "1.2.840.113549.1.9.22.1"),
        ] {
            assert_eq!(pkcs12::oid_name(raw), dotted);
        }
    }

    #[test]
    fn der_certificate() {
        let der = fixture("ca.der");
        let parsed = parse(&der);
        assert_eq!(parsed.kind, ContentKind::DerCertificate);
        assert!(parsed.errors.is_empty());
        assert_eq!(shas(&parsed), [CA_SHA256]);

        let truncated = parse(&der[..der.len() - 10]);
        assert_eq!(truncated.kind, ContentKind::DerCertificate);
        assert!(truncated.certs.is_empty());
        assert_eq!(truncated.errors.len(), 1);
        assert!(
            truncated.errors[0].starts_with("certificate 1 (DER file): malformed: "),
            "{:?}",
            truncated.errors
        );

        let trailing = parse(&concat(&[&der, b"xyz"]));
        assert_eq!(shas(&trailing), [CA_SHA256]);
        assert_eq!(
            trailing.errors,
            ["DER file: 3 bytes after the certificate ignored"]
        );
    }

    #[test]
    fn unknown_content() {
        let cnf = b"# OpenSSL configuration\nHOME = .\nopenssl_conf = openssl_init\n\n\
                    [openssl_init]\nproviders = provider_sect\n\n[ req ]\ndefault_bits = 2048\n";
        let empty = Parsed {
            kind: ContentKind::Unknown,
            secret: false,
            certs: vec![],
            errors: vec![],
            certs_dropped: 0,
        };
        assert_eq!(parse(cnf), empty);
        assert_eq!(parse(b""), empty);
        if let Ok(real) = std::fs::read("/etc/ssl/openssl.cnf") {
            assert_eq!(parse(&real), empty);
        }
        // A DER CRL looks like a certificate from outside, and CRLs are skipped.
        assert_eq!(parse(&fixture("ca.crl.der")), empty);
    }

    #[test]
    fn errors_are_capped() {
        let mut input = Vec::new();
        for _ in 0..500 {
            input.extend_from_slice(
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            );
        }
        let parsed = parse(&input);
        assert_eq!(parsed.errors.len(), MAX_ERRORS + 1);
        assert_eq!(
            parsed.errors[MAX_ERRORS],
            format!("{} further problems not listed", 500 - MAX_ERRORS)
        );
    }

    #[test]
    fn content_kind_serialises_in_snake_case() {
        assert_eq!(
            serde_json::to_string(&ContentKind::DerCertificate).unwrap(),
            "\"der_certificate\""
        );
        assert_eq!(
            serde_json::to_string(&ContentKind::Pkcs12).unwrap(),
            "\"pkcs12\""
        );
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let prefixes: [&[u8]; 7] = [
            b"",
            &[0xfe, 0xed, 0xfe, 0xed, 0, 0, 0, 2],
            &[0xce, 0xce, 0xce, 0xce, 0, 0, 0, 2],
            &[0x30, 0x82, 0x01, 0x00, 0x30, 0x82],
            &[0x30, 0x80, 0x02, 0x01, 0x03, 0x30, 0x80, 0x06, 0x09],
            b"-----BEGIN CERTIFICATE-----\n",
            b"-----BEGIN TRUSTED CERTIFICATE-----\nMIIB",
        ];
        for round in 0..3000 {
            let len = (rng.next() % 600) as usize;
            let input = concat(&[prefixes[round % prefixes.len()], &rng.bytes(len)]);
            parse(&input);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let names = [
            "ca.pem",
            "ca.der",
            "ca-trusted.pem",
            "trusted-certs.jks",
            "test-only-throwaway-keypair.jks",
            "trusted-certs-unencrypted.p12",
            "trusted-certs-encrypted.p12",
            "openssl-nokeys-unencrypted.p12",
        ];
        for name in names {
            let original = fixture(name);
            for _ in 0..300 {
                let mut bytes = original.clone();
                for _ in 0..=(rng.next() % 4) {
                    let at = (rng.next() as usize) % bytes.len();
                    bytes[at] = rng.next() as u8;
                }
                parse(&bytes);
            }
        }
    }
}
