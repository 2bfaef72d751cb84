//! icl (to be written)
