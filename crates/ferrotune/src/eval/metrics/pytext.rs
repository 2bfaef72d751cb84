//! Python's idea of whitespace, which both reference implementations lean on (`str.split()`,
//! `str.strip()`, `str.rstrip()`). Rust's `char::is_whitespace` is the Unicode `White_Space`
//! property; Python's `str.isspace()` also accepts the ASCII information separators
//! U+001C..U+001F (bidirectional class B/S). The fixture lists Python's full set and the tests
//! compare every code point.

/// `str.isspace()` for one character.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `s.split()` with no argument: runs of whitespace separate, no empty pieces.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// `s.rstrip()`.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}
