//! Java keystores. Certificates are stored in the clear; the password only protects
//! keys and the trailing integrity hash, both skipped.

use std::fmt;

use super::{Collector, quoted};

const JKS_MAGIC: [u8; 4] = [0xfe, 0xed, 0xfe, 0xed];
/// JCEKS shares JKS's layout for key and certificate entries.
const JCEKS_MAGIC: [u8; 4] = [0xce, 0xce, 0xce, 0xce];

const TAG_PRIVATE_KEY: u32 = 1;
const TAG_TRUSTED_CERT: u32 = 2;
const TAG_SECRET_KEY: u32 = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavour {
    Jks,
    Jceks,
}

pub(super) fn flavour(bytes: &[u8]) -> Option<Flavour> {
    match bytes.get(..4)? {
        m if m == JKS_MAGIC => Some(Flavour::Jks),
        m if m == JCEKS_MAGIC => Some(Flavour::Jceks),
        _ => None,
    }
}

/// A read past the end: every length in a keystore is checked against what is left
/// before anything is taken, so a lying length costs an error, not an allocation.
struct Short {
    what: &'static str,
    at: usize,
    need: u64,
    left: usize,
}

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "truncated: {} at offset {} needs {} bytes, {} left",
            self.what, self.at, self.need, self.left
        )
    }
}

impl From<Short> for String {
    fn from(short: Short) -> Self {
        short.to_string()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, need: u64, what: &'static str) -> Result<&'a [u8], Short> {
        let slice = usize::try_from(need)
            .ok()
            .and_then(|n| self.bytes.get(self.pos..self.pos.checked_add(n)?));
        let Some(slice) = slice else {
            return Err(Short {
                what,
                at: self.pos,
                need,
                left: self.left(),
            });
        };
        self.pos += slice.len();
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Short> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Short> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Short> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// Java's DataOutput.writeUTF: u16 length, then modified UTF-8.
    fn utf(&mut self, what: &'static str) -> Result<&'a [u8], Short> {
        let len = self.u16(what)?;
        self.take(u64::from(len), what)
    }
}

pub(super) fn read(bytes: &[u8], flavour: Flavour, col: &mut Collector) {
    let name = match flavour {
        Flavour::Jks => "JKS",
        Flavour::Jceks => "JCEKS",
    };
    let mut r = Reader { bytes, pos: 4 };
    let header = r
        .u32("version")
        .and_then(|v| Ok((v, r.u32("entry count")?)));
    let (version, count) = match header {
        Ok(h) => h,
        Err(short) => {
            col.error(format!("{name} header {short}"));
            return;
        }
    };
    if version != 1 && version != 2 {
        col.error(format!("{name} version {version} not supported"));
        return;
    }
    for index in 0..count {
        if r.left() == 0 {
            col.error(format!(
                "{name} keystore declares {count} entries but ends after {index}"
            ));
            return;
        }
        let mut entry = Entry {
            name,
            number: u64::from(index) + 1,
            count,
            alias: None,
            version,
            flavour,
        };
        if let Err(problem) = entry.read(&mut r, col) {
            col.error(format!("{}: {problem}", entry.context()));
            // Lengths past this point cannot be trusted to find the next entry.
            return;
        }
    }
    // What follows is the keyed SHA-1 of the store: checking it needs the password,
    // and the certificates are used whether it matches or not.
}

struct Entry<'a> {
    name: &'static str,
    number: u64,
    count: u32,
    alias: Option<&'a [u8]>,
    version: u32,
    flavour: Flavour,
}

impl<'a> Entry<'a> {
    fn context(&self) -> String {
        match self.alias {
            Some(alias) => format!(
                "{} entry {} of {} (alias {})",
                self.name,
                self.number,
                self.count,
                quoted(alias)
            ),
            None => format!("{} entry {} of {}", self.name, self.number, self.count),
        }
    }

    fn read(&mut self, r: &mut Reader<'a>, col: &mut Collector) -> Result<(), String> {
        let tag = r.u32("entry tag")?;
        self.alias = Some(r.utf("alias")?);
        r.take(8, "timestamp")?;
        match tag {
            TAG_PRIVATE_KEY => {
                col.secret = true;
                let key_len = r.u32("protected key length")?;
                r.take(u64::from(key_len), "protected key")?;
                let chain = r.u32("chain length")?;
                for link in 1..=chain {
                    self.certificate(r, col, Some(link))?;
                }
                Ok(())
            }
            TAG_TRUSTED_CERT => self.certificate(r, col, None),
            TAG_SECRET_KEY if self.flavour == Flavour::Jceks => {
                col.secret = true;
                Err(
                    "secret-key entry is a serialised Java object; later entries not read"
                        .to_owned(),
                )
            }
            other => Err(format!("unknown entry tag {other}; later entries not read")),
        }
    }

    fn certificate(
        &self,
        r: &mut Reader<'a>,
        col: &mut Collector,
        link: Option<u32>,
    ) -> Result<(), String> {
        let cert_type = if self.version == 2 {
            Some(r.utf("certificate type")?)
        } else {
            None
        };
        let len = r.u32("certificate length")?;
        let der = r.take(u64::from(len), "certificate")?;
        let n = col.next_ordinal();
        let whence = match link {
            Some(link) => format!("{}, chain certificate {link}", self.context()),
            None => self.context(),
        };
        match cert_type {
            Some(t) if t != b"X.509" => {
                col.cert_error(n, whence, format!("type {} is not X.509", quoted(t)));
            }
            _ => col.add_certificate(n, der, whence),
        }
        Ok(())
    }
}
