//! One error type for the library. Every variant renders as one line that names the file,
//! field or key at fault; the CLI prints it and exits non-zero (no panic, no backtrace).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or is malformed. `what` says what is wrong with it.
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    /// A configuration value (config.json key, GGUF metadata key, CLI flag) is missing or invalid.
    #[error("{source_name}: key `{key}`: {what}")]
    Key {
        source_name: String,
        key: String,
        what: String,
    },
    /// The model's architecture is not one we implement.
    #[error("{source_name}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArch {
        source_name: String,
        arch: String,
        supported: String,
    },
    /// A prompt does not fit the model's context window.
    #[error("prompt is {tokens} tokens but the model's context window is {context} tokens{hint}")]
    ContextOverflow {
        tokens: usize,
        context: usize,
        hint: String,
    },
    /// A chat template failed to render (e.g. an unknown variable).
    #[error("chat template: {0}")]
    Template(String),
    /// Anything else that is the user's input at fault, already phrased as one line.
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl Into<PathBuf>, what: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            what: what.to_string(),
        }
    }
    pub fn key(
        source_name: impl Into<String>,
        key: impl Into<String>,
        what: impl std::fmt::Display,
    ) -> Self {
        Error::Key {
            source_name: source_name.into(),
            key: key.into(),
            what: what.to_string(),
        }
    }
    pub fn msg(m: impl std::fmt::Display) -> Self {
        Error::Msg(m.to_string())
    }
}

/// Attach a file path to errors from lower layers.
pub trait WithPath<T> {
    fn with_path(self, path: &std::path::Path) -> Result<T>;
}

impl<T, E: std::fmt::Display> WithPath<T> for std::result::Result<T, E> {
    fn with_path(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::file(path, first_line(&e.to_string())))
    }
}

/// candle errors can carry multi-line backtraces; keep the message to one line.
pub fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Characters of a value from a file or a flag that messages show: the error stays one short
/// line whatever was given.
pub const SHOWN_CHARS: usize = 60;

/// `s` for a one-line message: control characters escaped (a newline would split the line),
/// at most [`SHOWN_CHARS`] characters, then how long it was.
pub fn clipped(s: &str) -> String {
    let n = s.chars().count();
    let mut out: String = s
        .chars()
        .take(SHOWN_CHARS)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if n > SHOWN_CHARS {
        out.push_str(&format!("... ({n} characters)"));
    }
    out
}

/// A number for an error message as a person would write it: `0.4`, `0`, `1e308` (Rust's
/// `{}` spells 1e308 with 309 digits, and `{:e}` spells 0 as `0e0`).
pub fn shown(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
#[test]
fn numbers_are_shown_short() {
    assert_eq!(shown(1e308), "1e308");
    assert_eq!(shown(-2.5e-7), "-2.5e-7");
    assert_eq!(shown(0.0), "0");
    assert_eq!(shown(0.4), "0.4");
    assert_eq!(shown(32.0), "32");
    assert_eq!(shown(f64::NAN), "NaN");
    assert_eq!(shown(f64::NEG_INFINITY), "-inf");
}

/// Run `f`, turning a panic inside it into `Err(message)` without printing it. Only for
/// third-party code that panics on malformed input (e.g. the tokenizers crate on some broken
/// tokenizer.json files): that is a bug there, but the user is still owed a one-line error.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::cell::Cell;
    thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    // Wrap whatever hook is installed (the CLI's one-line reporter, libFuzzer's abort) so that
    // it is skipped only for panics caught here, on this thread.
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info)
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    out.map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        first_line(msg)
    })
}
