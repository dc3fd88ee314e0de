//! PEM bundles as OpenSSL reads them: blocks between BEGIN and END lines, any text
//! around them ignored.

use super::{Collector, ContentKind, quoted};

enum BlockKind {
    Certificate,
    PrivateKey,
    Other,
}

struct Open<'a> {
    label: &'a [u8],
    line: usize,
    /// Certificates only: key blocks are never decoded, other blocks are skipped.
    cert: Option<(usize, Base64)>,
}

/// Returns None when no BEGIN line exists, so the content is not PEM.
pub(super) fn read(bytes: &[u8], col: &mut Collector) -> Option<ContentKind> {
    let mut open: Option<Open> = None;
    let mut saw_block = false;
    let mut saw_cert = false;
    let mut saw_key = false;
    for (index, raw_line) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = index + 1;
        let line = trim(raw_line, index == 0);
        if let Some(label) = armour(line, b"-----BEGIN ") {
            if let Some(block) = open.take() {
                unterminated(block, col);
            }
            saw_block = true;
            let cert = match classify(label) {
                BlockKind::Certificate => {
                    saw_cert = true;
                    // Past the cap a block is skipped undecoded; the scan goes on, since
                    // a key block further down still makes the file secret.
                    col.begin_certificate().map(|n| (n, Base64::default()))
                }
                BlockKind::PrivateKey => {
                    saw_key = true;
                    col.secret = true;
                    None
                }
                BlockKind::Other => None,
            };
            open = Some(Open {
                label,
                line: lineno,
                cert,
            });
            continue;
        }
        let Some(block) = open.as_mut() else {
            continue;
        };
        if let Some(end_label) = armour(line, b"-----END ") {
            if let Some(block) = open.take() {
                close(block, end_label, lineno, col);
            }
            continue;
        }
        if let Some((_, b64)) = block.cert.as_mut() {
            b64.feed(line, lineno);
        }
    }
    if let Some(block) = open.take() {
        unterminated(block, col);
    }
    if !saw_block {
        return None;
    }
    // A key beside certificates is the server's own pair: the certificates are what
    // the catalog compares. A key with only parameters beside it (`openssl ecparam
    // -genkey`) is still a key file.
    Some(if saw_key && !saw_cert {
        ContentKind::PrivateKey
    } else {
        ContentKind::PemBundle
    })
}

fn close(block: Open<'_>, end_label: &[u8], end_line: usize, col: &mut Collector) {
    let whence = format!("PEM block at line {}", block.line);
    if end_label != block.label {
        let problem = format!("ends with END {} at line {end_line}", quoted(end_label));
        match block.cert {
            Some((n, _)) => col.cert_error(n, whence, problem),
            None => col.error(format!(
                "PEM block {} at line {}: {problem}",
                quoted(block.label),
                block.line
            )),
        }
        return;
    }
    let Some((n, b64)) = block.cert else {
        return;
    };
    match b64.finish() {
        Ok(der) => col.add_certificate(n, &der, whence),
        Err(problem) => col.cert_error(n, whence, problem),
    }
}

fn unterminated(block: Open<'_>, col: &mut Collector) {
    match block.cert {
        Some((n, _)) => col.cert_error(
            n,
            format!("PEM block at line {}", block.line),
            "no END line",
        ),
        None => col.error(format!(
            "PEM block {} at line {}: no END line",
            quoted(block.label),
            block.line
        )),
    }
}

fn classify(label: &[u8]) -> BlockKind {
    match label {
        b"CERTIFICATE" | b"X509 CERTIFICATE" | b"TRUSTED CERTIFICATE" => BlockKind::Certificate,
        // PRIVATE KEY, RSA/EC/DSA PRIVATE KEY, ENCRYPTED PRIVATE KEY, OPENSSH PRIVATE KEY, …
        l if l.ends_with(b"PRIVATE KEY") => BlockKind::PrivateKey,
        _ => BlockKind::Other,
    }
}

/// The label of a `-----BEGIN LABEL-----` (or END) line.
fn armour<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    line.strip_prefix(prefix)?.strip_suffix(b"-----")
}

fn trim(line: &[u8], first: bool) -> &[u8] {
    let line = if first {
        line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line)
    } else {
        line
    };
    line.trim_ascii()
}

/// Streaming decoder, so that a certificate block is decoded line by line and a bad
/// character can be reported with its line.
#[derive(Default)]
struct Base64 {
    out: Vec<u8>,
    acc: u32,
    sextets: u8,
    padding: u8,
    bad_line: Option<usize>,
}

impl Base64 {
    fn feed(&mut self, line: &[u8], lineno: usize) {
        if self.bad_line.is_some() {
            return;
        }
        for &c in line {
            let value = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' => {
                    self.padding += 1;
                    if self.padding > 2 {
                        self.bad_line = Some(lineno);
                        return;
                    }
                    continue;
                }
                b' ' | b'\t' | b'\r' => continue,
                _ => {
                    self.bad_line = Some(lineno);
                    return;
                }
            };
            if self.padding > 0 {
                self.bad_line = Some(lineno);
                return;
            }
            self.acc = (self.acc << 6) | u32::from(value);
            self.sextets += 1;
            if self.sextets == 4 {
                self.out.extend_from_slice(&self.acc.to_be_bytes()[1..]);
                self.acc = 0;
                self.sextets = 0;
            }
        }
    }

    fn finish(mut self) -> Result<Vec<u8>, String> {
        if let Some(line) = self.bad_line {
            return Err(format!("bad base64 at line {line}"));
        }
        match self.sextets {
            0 => {}
            2 => self
                .out
                .extend_from_slice(&(self.acc >> 4).to_be_bytes()[3..]),
            3 => self
                .out
                .extend_from_slice(&(self.acc >> 2).to_be_bytes()[2..]),
            _ => return Err("base64 ends mid-byte".to_owned()),
        }
        Ok(self.out)
    }
}
