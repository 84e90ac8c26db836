//! The integration tests, built as one test binary (Cargo links one
//! executable instead of one per file). Each module is one suite; the
//! `*_support` and `common` modules hold the helpers they share.
//!
//! Run one suite with `cargo test --release --test it cli_roundtrip::`.

mod support;

mod cli_messages;
mod cli_roundtrip;
mod cli_signals;
mod export;
mod extract_safety;
mod faults;
mod fuzz_regressions;
mod hostile;
mod incremental;
mod index_property;
mod live_backup;
mod live_create;
mod live_failure;
mod live_memory;
mod live_serve;
mod nbd_hostile;
mod nbd_libnbd;
mod nbd_qemu;
mod nbd_server;
mod proxmox_compat;
mod qmp_binary_env;
mod qmp_daemon;
mod qmp_fake;
mod random_access;
mod s3;
mod systemd;
mod tls;
mod vma_golden;
mod vma_malformed;
mod vma_proptest;
mod vma_writer;
