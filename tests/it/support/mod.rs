//! The test kit every suite shares, one of each: running a program to its
//! end with a deadline and asserting how it ended ([`cmd`]: the binary as
//! [`vma`] / [`TestEnv`], tools as [`run_ok`]), long-running children and
//! their `--json` events ([`proc`]: [`Proc`]), starting `serve`
//! ([`serve`]: [`ServeCmd`]), starting `export` ([`export`]:
//! [`ExportCmd`]), the PRNG and test data ([`data`]:
//! [`XorShift`]), making images ([`image`]), comparing files ([`compare`]:
//! [`assert_same_file`], sparse-aware), checking archives through the
//! binary ([`check`]), QEMU, nbdkit and process checks ([`qemu`]: the
//! library's own `StorageDaemon` via [`start_daemon`]), the missing-tool
//! rule ([`tools`]: [`require_tools`]), archives built and edited with the
//! library ([`archive`]) and the in-process NBD server and raw client
//! ([`nbd`]), and TLS certificates made with openssl plus a rustls
//! client ([`tls`]: [`Pki`]).
//!
//! Everything is re-exported here: a suite writes `use crate::support::*`
//! or `support::name`.

#![allow(dead_code, unused_imports)]

pub mod archive;
pub mod check;
pub mod cmd;
pub mod compare;
pub mod data;
pub mod export;
pub mod image;
pub mod nbd;
pub mod proc;
pub mod qemu;
pub mod s3;
pub mod serve;
pub mod tls;
pub mod tools;

pub use archive::*;
pub use check::*;
pub use cmd::*;
pub use compare::*;
pub use data::*;
pub use export::*;
pub use image::*;
pub use nbd::*;
pub use proc::*;
pub use qemu::*;
pub use serve::*;
pub use tls::*;
pub use tools::*;
