//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) through the same checks the
//! fuzz targets run, on stable, in every `cargo test`: an input that once crashed the
//! daemon, kept in the corpus, keeps proving it no longer does.

use std::{fs, path::Path};

use trustdrift::fuzz_targets;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the {target} corpus at {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "the {target} corpus is empty");
    for input in &inputs {
        let bytes = fs::read(input).expect("reading a corpus input");
        // Name the input that fails, so it can be run under the fuzzer alone.
        let outcome = std::panic::catch_unwind(|| check(&bytes));
        assert!(
            outcome.is_ok(),
            "{} fails its {target} check",
            input.display()
        );
    }
    eprintln!("{target}: {} inputs replayed", inputs.len());
}

#[test]
fn every_trust_file_in_the_corpus_parses_without_panicking_or_leaking() {
    replay("store_format", fuzz_targets::store_format);
}

#[test]
fn every_ring_buffer_record_in_the_corpus_decodes_or_is_refused() {
    replay("event", fuzz_targets::event);
}

#[test]
fn every_configuration_in_the_corpus_is_an_error_or_round_trips() {
    replay("config", fuzz_targets::config);
}
