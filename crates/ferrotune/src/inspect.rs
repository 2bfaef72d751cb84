//! inspect (to be written)
