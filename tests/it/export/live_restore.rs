//! live-restore.
