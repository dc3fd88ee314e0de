//! The end-to-end tests' view of the test kit (`testkit/`, shared with the benchmarks):
//! they run the real `trustdrift` binary (as built by `cargo xtask build`) against real
//! programs, and clean up every process, file and mount they create, even when a test
//! fails.
//!
//! With `CI=true`, a test that cannot load the probe fails; elsewhere it says why it is
//! skipped (typically: not root).

pub use trustdrift_testkit::{
    Cert, Daemon, DaemonSetup, Guarded, PinDir, Reloading, SOON, TLS_AGENT, TempDir, Trace, Value,
    bundle, free_port, has_program, http_get, http_response, in_ci, is_root, make_certificate,
    minimal_certificates, probe_unavailable, python_reader, python_tls_server, python3, random_hex,
    random_u64, records_for, replace_atomically, repo, sha256_hex, sha256_of, shas,
    spawn_after_read, target_dir, trustdrift_bin,
};
