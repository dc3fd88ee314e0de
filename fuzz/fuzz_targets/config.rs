#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| trustdrift::fuzz_targets::config(data));
