//! trustdrift's daemon as a library: the binary (`main.rs`) is its command line, and the
//! fuzz targets and corpus replays reach the parsers through here.
//!
//! Data flows one way, and the folders follow it:
//!
//! ```text
//! probe ──records──▶ events ──▶ engine ──▶ ledger ──▶ judge ──▶ serve
//!  (kernel side:       (decode,    │   (what each     (verdicts)  (API, metrics,
//!   load, filter,       intake)    │    process read)             views)
//!   pin)                           ▼
//!                        process ─ stores
//!                        (who a     (trust files as each root sees them:
//!                         process    versions, contents, formats, watches)
//!                         is, its
//!                         root)
//! ```
//!
//! - [`probe`] loads and attaches the eBPF probe and reads what it keeps in maps;
//! - [`events`] takes its records out of the ring buffer and decodes them;
//! - [`process`] learns who a process is and reads inside its root, safely;
//! - [`stores`] versions every trust file each root sees and parses what it holds;
//! - [`ledger`] records, per process image, which versions it read (and persists it);
//! - [`judge`] compares what each process read with what is on disk now;
//! - [`engine`] is the loop that drives all of the above and publishes a snapshot;
//! - [`serve`] renders the snapshot: the HTTP API, the metrics and their views;
//! - [`cli`] talks to a running daemon, or traces accesses live;
//! - [`budget`] bounds bytes held across threads (parsed content, reads in flight);
//! - [`allocator`] keeps the heap a daemon's size after storms.

pub mod allocator;
pub mod budget;
pub mod cli;
pub mod config;
pub mod engine;
pub mod events;
pub mod judge;
pub mod ledger;
pub mod probe;
pub mod process;
pub mod serve;
pub mod stores;

pub mod fuzz_targets {
    //! What must hold for any bytes the world hands the daemon: the checks behind each
    //! `cargo fuzz` target (fuzz/), also replayed over the committed corpus by `cargo test`
    //! so CI runs them on stable without a fuzzer. A violated property panics.

    use crate::{config::Config, events, stores::formats};

    /// A trust file's content (PEM, DER, JKS, PKCS#12, or garbage).
    pub fn store_format(bytes: &[u8]) {
        let parsed = formats::parse(bytes);
        // One line per problem, capped, plus the line saying how many more there were.
        assert!(
            parsed.errors.len() <= formats::MAX_ERRORS + 1,
            "{} error lines",
            parsed.errors.len()
        );
        let mut seen = std::collections::HashSet::new();
        for cert in &parsed.certs {
            assert!(
                cert.sha256.len() == 64 && cert.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "fingerprint {:?}",
                cert.sha256
            );
            assert!(seen.insert(&cert.sha256), "certificate listed twice");
        }
        // A key is recognised, never decoded: nothing of it may come back out.
        if parsed.kind == formats::ContentKind::PrivateKey {
            assert!(parsed.certs.is_empty());
        }
    }

    /// A ring-buffer record (the kernel writes them, but a mismatched probe or a corrupt
    /// record must be an error, never a panic or a misread).
    pub fn event(bytes: &[u8]) {
        if let Ok(events::Event::Access(a)) = events::decode(bytes) {
            assert!(a.path.as_os_str().len() <= trustdrift_common::PATH_CAP);
        }
    }

    /// A configuration file: either an error naming what is wrong, or a configuration that
    /// prints back as TOML and reads back identical.
    pub fn config(bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        match Config::from_toml(text, "fuzz.toml") {
            Ok(config) => {
                let printed = config.to_toml();
                let again = Config::from_toml(&printed, "printed.toml")
                    .unwrap_or_else(|e| panic!("the printed configuration is invalid: {e}"));
                assert_eq!(config, again, "round trip changed the configuration");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
