//! JSON mode constraint (in progress).
