//! The VMA format.
