//! The checks several methods' `validate` make on the keys of an `adapter_config.json`, with
//! one wording for all: each returns a one-line [`Error::key`] naming `source` and the key.
use crate::{Error, Result};

/// `peft_type` must be `want` ("LORA", "IA3").
pub(crate) fn peft_type(source: &str, got: &str, want: &str) -> Result<()> {
    if got != want {
        return Err(Error::key(
            source,
            "peft_type",
            format!("`{got}` is not {want}"),
        ));
    }
    Ok(())
}

/// A dropout probability: in [0, 1).
pub(crate) fn probability(source: &str, key: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::key(source, key, format!("{p} is not in [0, 1)")));
    }
    Ok(())
}

/// A size read from the file: 1 to `max`.
pub(crate) fn size_in_range(source: &str, key: &str, n: usize, max: usize) -> Result<()> {
    if n == 0 || n > max {
        return Err(Error::key(
            source,
            key,
            format!("{n} is out of range (1 to {max})"),
        ));
    }
    Ok(())
}

/// A list of module names (`modules_to_save`, `target_modules`) holds no empty name.
pub(crate) fn no_empty_name<'a>(
    source: &str,
    key: &str,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<()> {
    if names.into_iter().any(|n| n.is_empty()) {
        return Err(Error::key(source, key, "holds an empty name"));
    }
    Ok(())
}
