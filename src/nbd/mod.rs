//! The NBD server.

mod backend;

pub use backend::{Backend, BackendCaps, BlockStatus};
