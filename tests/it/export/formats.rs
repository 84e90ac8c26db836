//! `extract --format`.
