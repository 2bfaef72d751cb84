//! The fast CPU batch engine (in progress).
