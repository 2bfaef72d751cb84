//! generate (to be written)
