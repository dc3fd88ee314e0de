//! PKCS#12 (RFC 7292) stores, as far as they can be read without a password: the
//! certBags of unencrypted SafeContents, which is how OpenJDK ships its PKCS#12
//! cacerts. BER is accepted, since some producers use indefinite lengths.

use super::{Any, Class, Collector, Cow, FromBer, Header, Oid, Tag, asn1_rs};

/// 1.2.840.113549.1.7 (PKCS#7 content types), the prefix every authSafe type shares.
const OID_PKCS7: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07];
/// 1.2.840.113549.1.7.1
pub(super) const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
/// 1.2.840.113549.1.7.2
pub(super) const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
/// 1.2.840.113549.1.7.3
pub(super) const OID_ENVELOPED_DATA: &[u8] =
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
/// 1.2.840.113549.1.7.6
pub(super) const OID_ENCRYPTED_DATA: &[u8] =
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x06];
/// 1.2.840.113549.1.12.10.1.3
pub(super) const OID_CERT_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
];
/// 1.2.840.113549.1.12.10.1.6
pub(super) const OID_SAFE_CONTENTS_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x06,
];
/// 1.2.840.113549.1.9.22.1
pub(super) const OID_X509_CERTIFICATE: &[u8] =
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01];

pub(super) const ENCRYPTED_SKIPPED: &str = "PKCS#12 encrypted contents skipped (password needed)";

/// Nested safeContentsBags are legal but unused in practice; the cap only bounds
/// recursion on hostile input.
const MAX_NESTING: usize = 4;

/// PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo, … }. Only headers
/// are checked, so that a truncated store is still recognised as one.
pub(super) fn looks_like(bytes: &[u8]) -> bool {
    let sniff = || -> Option<bool> {
        let (rest, pfx) = Header::from_ber(bytes).ok()?;
        let (rest, version) = Any::from_ber(rest).ok()?;
        let (rest, auth_safe) = Header::from_ber(rest).ok()?;
        let (_, content_type) = Any::from_ber(rest).ok()?;
        Some(
            is_universal(&pfx, Tag::Sequence)
                && is_universal(&version.header, Tag::Integer)
                && version.data == [3]
                && is_universal(&auth_safe, Tag::Sequence)
                && is_universal(&content_type.header, Tag::Oid)
                && content_type.data.starts_with(OID_PKCS7),
        )
    };
    sniff().unwrap_or(false)
}

pub(super) fn read(bytes: &[u8], col: &mut Collector) {
    let mut walk = Walk {
        col,
        bags: 0,
        encrypted_reported: false,
    };
    if let Err(problem) = walk.pfx(bytes) {
        walk.col.error(format!("PKCS#12: {problem}"));
    }
}

struct Walk<'c> {
    col: &'c mut Collector,
    bags: usize,
    encrypted_reported: bool,
}

impl Walk<'_> {
    fn pfx(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (_, pfx) = Any::from_ber(bytes).map_err(|e| format!("PFX: {}", problem(&e)))?;
        let mut items = Elements::of(&pfx, "PFX")?;
        items.next_required("version")?;
        let auth_safe = items.next_required("authSafe")?;
        let (content_type, content) = content_info(&auth_safe, "authSafe")?;
        match content_type {
            OID_DATA => {
                let octets = explicit_octets(content, "authSafe")?;
                self.authenticated_safe(&octets)
            }
            OID_SIGNED_DATA => {
                Err("public-key integrity mode (signedData) not supported".to_owned())
            }
            other => Err(format!(
                "authSafe content type {} not supported",
                oid_name(other)
            )),
        }
    }

    /// AuthenticatedSafe ::= SEQUENCE OF ContentInfo. A broken ContentInfo is reported
    /// and the next one still read: each is delimited by its own length.
    fn authenticated_safe(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (_, seq) =
            Any::from_ber(bytes).map_err(|e| format!("AuthenticatedSafe: {}", problem(&e)))?;
        for (index, item) in Elements::of(&seq, "AuthenticatedSafe")?.enumerate() {
            if let Err(problem) = item.and_then(|ci| self.safe_contents_info(&ci)) {
                self.col
                    .error(format!("PKCS#12 ContentInfo {}: {problem}", index + 1));
            }
        }
        Ok(())
    }

    fn safe_contents_info(&mut self, ci: &Any<'_>) -> Result<(), String> {
        let (content_type, content) = content_info(ci, "ContentInfo")?;
        match content_type {
            OID_DATA => {
                let octets = explicit_octets(content, "SafeContents")?;
                let (_, seq) =
                    Any::from_ber(&octets).map_err(|e| format!("SafeContents: {}", problem(&e)))?;
                self.safe_contents(&seq, 0)
            }
            // One line for the whole store: a password opens all of its parts or none.
            // Encrypted parts hold the keys in most stores: unknown, so assumed.
            OID_ENCRYPTED_DATA => {
                self.col.secret = true;
                if !self.encrypted_reported {
                    self.encrypted_reported = true;
                    self.col.error(ENCRYPTED_SKIPPED.to_owned());
                }
                Ok(())
            }
            OID_ENVELOPED_DATA => {
                self.col.secret = true;
                Err("enveloped contents skipped (recipient's private key needed)".to_owned())
            }
            other => Err(format!("content type {} skipped", oid_name(other))),
        }
    }

    /// SafeContents ::= SEQUENCE OF SafeBag.
    fn safe_contents(&mut self, seq: &Any<'_>, depth: usize) -> Result<(), String> {
        for bag in Elements::of(seq, "SafeContents")? {
            self.bags += 1;
            let number = self.bags;
            if let Err(problem) = bag.and_then(|bag| self.safe_bag(&bag, number, depth)) {
                self.col.error(format!("PKCS#12 bag {number}: {problem}"));
            }
        }
        Ok(())
    }

    /// SafeBag ::= SEQUENCE { bagId OID, bagValue [0] EXPLICIT ANY, bagAttributes … }.
    /// Key bags are left undecoded; CRL and secret bags hold no certificates.
    fn safe_bag(&mut self, bag: &Any<'_>, number: usize, depth: usize) -> Result<(), String> {
        let mut items = Elements::of(bag, "SafeBag")?;
        let bag_id = expect_oid(&items.next_required("bagId")?, "bagId")?;
        match bag_id {
            OID_CERT_BAG => {
                let value = explicit(&items.next_required("bagValue")?, "bagValue")?;
                self.cert_bag(&value, number)
            }
            OID_SAFE_CONTENTS_BAG if depth < MAX_NESTING => {
                let value = explicit(&items.next_required("bagValue")?, "bagValue")?;
                self.safe_contents(&value, depth + 1)
            }
            OID_SAFE_CONTENTS_BAG => Err("safeContentsBag nested too deeply".to_owned()),
            // keyBag, pkcs8ShroudedKeyBag, secretBag and anything unknown: not decoded,
            // and possibly key material.
            _ => {
                self.col.secret = true;
                Ok(())
            }
        }
    }

    /// CertBag ::= SEQUENCE { certId OID, certValue [0] EXPLICIT OCTET STRING }.
    fn cert_bag(&mut self, value: &Any<'_>, number: usize) -> Result<(), String> {
        let mut items = Elements::of(value, "CertBag")?;
        let cert_id = expect_oid(&items.next_required("certId")?, "certId")?;
        let n = self.col.next_ordinal();
        let whence = format!("PKCS#12 bag {number}");
        if cert_id != OID_X509_CERTIFICATE {
            self.col.cert_error(
                n,
                whence,
                format!("type {} is not X.509", oid_name(cert_id)),
            );
            return Ok(());
        }
        let cert_value = items.next_required("certValue")?;
        match explicit(&cert_value, "certValue").and_then(|v| octets(&v, "certValue", 0)) {
            Ok(der) => self.col.add_certificate(n, &der, whence),
            Err(problem) => self.col.cert_error(n, whence, problem),
        }
        Ok(())
    }
}

/// The elements of a constructed value, in order; stops after the first unreadable one.
struct Elements<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Elements<'a> {
    fn of(any: &Any<'a>, what: &'static str) -> Result<Self, String> {
        if !is_universal(&any.header, Tag::Sequence) {
            return Err(format!("{what}: not a SEQUENCE"));
        }
        Ok(Elements {
            rest: any.data,
            what,
        })
    }

    fn next_required(&mut self, field: &str) -> Result<Any<'a>, String> {
        self.next()
            .unwrap_or_else(|| Err(format!("{}: {field} missing", self.what)))
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<Any<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match Any::from_ber(self.rest) {
            Ok((rest, any)) => {
                self.rest = rest;
                Some(Ok(any))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(format!("{}: {}", self.what, problem(&e))))
            }
        }
    }
}

/// ContentInfo ::= SEQUENCE { contentType OID, content [0] EXPLICIT ANY OPTIONAL }.
fn content_info<'a>(
    ci: &Any<'a>,
    what: &'static str,
) -> Result<(&'a [u8], Option<Any<'a>>), String> {
    let mut items = Elements::of(ci, what)?;
    let content_type = expect_oid(&items.next_required("contentType")?, what)?;
    let content = match items.next() {
        Some(item) => Some(explicit(&item?, what)?),
        None => None,
    };
    Ok((content_type, content))
}

fn explicit_octets<'a>(
    content: Option<Any<'a>>,
    what: &'static str,
) -> Result<Cow<'a, [u8]>, String> {
    let content = content.ok_or_else(|| format!("{what}: content missing"))?;
    octets(&content, what, 0)
}

/// The value inside a [0] EXPLICIT tag.
fn explicit<'a>(tagged: &Any<'a>, what: &str) -> Result<Any<'a>, String> {
    let h = &tagged.header;
    if h.class() != Class::ContextSpecific || h.tag() != Tag(0) || !h.is_constructed() {
        return Err(format!("{what}: expected [0]"));
    }
    Any::from_ber(tagged.data)
        .map(|(_, inner)| inner)
        .map_err(|e| format!("{what}: {}", problem(&e)))
}

/// BER allows an OCTET STRING to arrive in constructed chunks; they are joined.
fn octets<'a>(any: &Any<'a>, what: &str, depth: usize) -> Result<Cow<'a, [u8]>, String> {
    if any.header.class() != Class::Universal || any.header.tag() != Tag::OctetString {
        return Err(format!("{what}: not an OCTET STRING"));
    }
    if !any.header.is_constructed() {
        return Ok(Cow::Borrowed(any.data));
    }
    if depth >= MAX_NESTING {
        return Err(format!("{what}: OCTET STRING chunks nested too deeply"));
    }
    let mut joined = Vec::new();
    let mut rest = any.data;
    while !rest.is_empty() {
        let (next, chunk) = Any::from_ber(rest).map_err(|e| format!("{what}: {}", problem(&e)))?;
        joined.extend_from_slice(&octets(&chunk, what, depth + 1)?);
        rest = next;
    }
    Ok(Cow::Owned(joined))
}

fn expect_oid<'a>(any: &Any<'a>, what: &str) -> Result<&'a [u8], String> {
    if is_universal(&any.header, Tag::Oid) {
        Ok(any.data)
    } else {
        Err(format!("{what}: not an OBJECT IDENTIFIER"))
    }
}

fn is_universal(h: &Header<'_>, tag: Tag) -> bool {
    h.class() == Class::Universal && h.tag() == tag
}

pub(super) fn oid_name(raw: &[u8]) -> String {
    if raw.len() > 32 {
        return "(overlong OID)".to_owned();
    }
    Oid::new(Cow::Borrowed(raw)).to_id_string()
}

fn problem(e: &asn1_rs::Err<asn1_rs::Error>) -> String {
    match e {
        asn1_rs::Err::Incomplete(_) => "truncated".to_owned(),
        asn1_rs::Err::Error(e) | asn1_rs::Err::Failure(e) => e.to_string(),
    }
}
