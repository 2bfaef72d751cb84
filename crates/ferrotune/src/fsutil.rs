//! Writing without losing the user's files: atomic writes, output paths checked against the
//! command's own inputs, and folders that ferrotune recognises as its own by a marker file it
//! writes when it creates them.
//!
//! The rules every command follows:
//! - a file is written into a temporary sibling and renamed into place, so a kill leaves the old
//!   file or the new one, never half of one;
//! - an output never lands on an input (the data file, the model, an adapter), whatever the
//!   flags: paths are compared after resolving symbolic links and `..`;
//! - an existing output file, or a folder holding files ferrotune did not write, is replaced only
//!   with `--overwrite`;
//! - a folder output (`convert`, `merge`) is built in a temporary sibling folder and renamed into
//!   place whole.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};

/// The marker file ferrotune writes into every folder it creates.
pub const MARKER_FILE: &str = ".ferrotune";

/// What a marker says: who wrote the folder, what kind of folder it is, and (for folders
/// written whole, such as an HF folder) the files in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub written_by: String,
    /// `run` (a training run folder) or `hf_folder` (convert, merge).
    pub kind: String,
    /// The entries ferrotune wrote (empty for run folders, whose files change as they run).
    #[serde(default)]
    pub files: Vec<String>,
}

impl Marker {
    pub fn new(kind: &str, files: Vec<String>) -> Self {
        Marker {
            written_by: "ferrotune".into(),
            kind: kind.into(),
            files,
        }
    }
}

/// The marker of `dir`, if it has one that parses.
pub fn read_marker(dir: &Path) -> Option<Marker> {
    let text = std::fs::read_to_string(dir.join(MARKER_FILE)).ok()?;
    serde_json::from_str::<Marker>(&text)
        .ok()
        .filter(|m| m.written_by == "ferrotune")
}

pub fn write_marker(dir: &Path, marker: &Marker) -> Result<()> {
    let text = serde_json::to_string_pretty(marker).expect("a marker always serializes");
    write_atomic(&dir.join(MARKER_FILE), text.as_bytes())
}

/// The temporary sibling an atomic write of `path` goes through: `.NAME.PID.tmp`.
fn tmp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "is not a file path"))?
        .to_string_lossy()
        .to_string();
    remove_stale_tmp_siblings(path, &name);
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    in_flight().push(tmp.clone());
    Ok(tmp)
}

/// Temporary files and folders being written now (see [`remove_in_flight`]).
fn in_flight() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static IN_FLIGHT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

fn done_in_flight(tmp: &Path) {
    in_flight().retain(|p| p != tmp);
}

/// Remove the temporary files and folders this process is writing (half-written outputs that
/// will never be renamed into place): for a Ctrl-C or SIGTERM handler before it exits, so an
/// interrupted `quantize` or `merge` leaves nothing behind. Returns how many it removed.
pub fn remove_in_flight() -> usize {
    let paths = std::mem::take(&mut *in_flight());
    let mut n = 0;
    for p in paths {
        let gone = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        n += gone.is_ok() as usize;
    }
    n
}

/// `.NAME.PID.tmp` siblings of `path` left by a process that no longer runs (a kill -9 or a
/// power cut while it wrote): removed, since only a live writer can still finish them. Only
/// where `/proc` tells which processes run.
fn remove_stale_tmp_siblings(path: &Path, name: &str) {
    let proc_root = Path::new("/proc/self");
    if !proc_root.exists() {
        return;
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Rename the finished temporary file `tmp` to `path` (removing `tmp` on failure).
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    let r = std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        Error::file(path, e)
    });
    done_in_flight(tmp);
    r
}

/// Write `bytes` to `path` through a temporary sibling (`.NAME.PID.tmp`), flushed to disk, and
/// a rename: a crash never leaves a half-written file under the final name.
/// `std::fs::read_to_string` for a file of a model folder (config.json, tokenizer.json, an
/// index, a chat template): only a regular file (after symlinks) is opened, since opening a
/// FIFO blocks until a writer appears and a device such as /dev/zero never ends. (Files the
/// user names on the command line may be pipes, as `--config <(...)` is: those are read with
/// the usual calls, and [`read_text_limited`] where they could be endless.)
pub fn read_to_string(path: impl AsRef<Path>) -> std::io::Result<String> {
    let path = path.as_ref();
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file (a folder, FIFO or device); refused",
        ));
    }
    std::fs::read_to_string(path)
}

/// A text file read whole, refusing more than `limit` bytes before reading past it (a huge
/// file or an endless pipe would otherwise fill memory), and a folder or a device at once.
pub fn read_text_limited(path: &Path, limit: u64) -> Result<String> {
    // a folder or a device is refused before a byte is read (/dev/zero would fill `limit`)
    input_size_limit(path)?;
    read_at_most(path, limit)
}

/// `path` read whole as UTF-8, refusing more than `limit` bytes (the caller checked its type).
fn read_at_most(path: &Path, limit: u64) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::file(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::file(
            path,
            format!("larger than {limit} bytes, the most this reads"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| Error::file(path, not_utf8(e.as_bytes(), e.utf8_error())))
}

/// How far past its reported size a regular input file is read.
pub const REGULAR_INPUT_SLACK: u64 = 1 << 20;

/// The most a user-named input that is not a regular file (a pipe, as `<(...)` gives) may
/// hold: a regular file is read whole at its size, a pipe has none to check.
pub const PIPE_INPUT_LIMIT: u64 = 4 << 30;

/// A text file the user named (data, prompts, predictions, few-shot examples), read whole as
/// UTF-8. A folder or a device (`/dev/zero` never ends) is refused before any read; a pipe is
/// read up to [`PIPE_INPUT_LIMIT`]; invalid UTF-8 names its line. Errors name the file.
pub fn read_input_text(path: &Path) -> Result<String> {
    let limit = input_size_limit(path)?;
    read_at_most(path, limit)
}

/// Refuse what cannot be an input file (a folder, a character or block device, a socket)
/// with a one-line error naming it; the bytes a read of it may take otherwise.
pub fn input_size_limit(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::file(path, "is a folder, expected a file"));
    }
    #[cfg(unix)]
    let device = {
        use std::os::unix::fs::FileTypeExt;
        ft.is_char_device() || ft.is_block_device() || ft.is_socket()
    };
    #[cfg(not(unix))]
    let device = false;
    if device {
        return Err(Error::file(
            path,
            "is a device or socket, not a file; refused",
        ));
    }
    // A regular file's size, plus room: procfs and sysfs files report 0 bytes and still hold
    // text, and a file that grows a little between the stat and the read is still read.
    Ok(if ft.is_file() {
        meta.len().saturating_add(REGULAR_INPUT_SLACK)
    } else {
        PIPE_INPUT_LIMIT
    })
}

/// A file of a model or adapter folder opened for reading (to map or parse): only a regular
/// file, since opening a FIFO blocks until a writer appears and a device never ends.
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    check_regular(path)?;
    std::fs::File::open(path).map_err(|e| Error::file(path, e))
}

/// [`open_regular`]'s check alone, for files another library opens (candle's mapped
/// safetensors).
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    if !meta.is_file() {
        return Err(Error::file(
            path,
            "is not a regular file (a folder, FIFO or device); refused",
        ));
    }
    Ok(())
}

/// "not UTF-8 text", with the line and byte where the first invalid sequence starts.
fn not_utf8(bytes: &[u8], e: std::str::Utf8Error) -> String {
    let at = e.valid_up_to();
    let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
    format!("not UTF-8 text (line {line}, byte {at}: an invalid byte sequence)")
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = tmp_sibling(path)?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        done_in_flight(&tmp);
        return Err(tmp_error(path, &tmp, e));
    }
    rename_into_place(&tmp, path)
}

/// A failure writing `tmp`, the temporary sibling of `path`: named by the file the user asked
/// for, the temporary name after it.
fn tmp_error(path: &Path, tmp: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(
        path,
        format!(
            "{e} (writing it through the temporary file {} beside it)",
            tmp.file_name().unwrap_or_default().to_string_lossy()
        ),
    )
}

/// [`write_atomic`] for a file too large to hold in memory: `fill` streams it into the
/// temporary sibling (buffered), which is flushed to disk and renamed into place only if `fill`
/// succeeds; on failure the temporary file is removed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = tmp_sibling(path)?;
    let file = std::fs::File::create(&tmp).map_err(|e| {
        done_in_flight(&tmp);
        tmp_error(path, &tmp, e)
    })?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let done = fill(&mut w).and_then(|()| {
        let f = w
            .into_inner()
            .map_err(|e| tmp_error(path, &tmp, e.error()))?;
        f.sync_all().map_err(|e| tmp_error(path, &tmp, e))
    });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        done_in_flight(&tmp);
        return Err(e);
    }
    rename_into_place(&tmp, path)
}

/// Write `tensors` as a safetensors file at `path` the same way as [`write_atomic`] (a
/// temporary sibling, then a rename), without holding the file's bytes in memory.
pub fn write_safetensors(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let tmp = tmp_sibling(path)?;
    // safetensors writes through its own temporary file (mode 0600) and renames it onto `tmp`:
    // give the result the permissions a plain File::create gives (0666 less the umask), as
    // every other file we write has, so that a shared model folder stays readable.
    let perms = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .map_err(|e| Error::file(&tmp, e))?;
    let saved = candle_core::safetensors::save(tensors, &tmp)
        .map_err(|e| crate::error::first_line(&e.to_string()))
        .and_then(|()| std::fs::set_permissions(&tmp, perms).map_err(|e| e.to_string()));
    if let Err(e) = saved {
        let _ = std::fs::remove_file(&tmp);
        done_in_flight(&tmp);
        return Err(tmp_error(path, &tmp, e));
    }
    rename_into_place(&tmp, path)
}

/// `p` made absolute (against the current directory) with `.` and `dir/..` folded, without
/// touching the file system.
pub fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c.as_os_str()),
        }
    }
    out
}

/// Where `p` really is: symbolic links resolved in the longest part of it that exists, the rest
/// appended. Two paths naming the same file resolve to the same path.
pub fn resolve(p: &Path) -> PathBuf {
    let abs = absolute(p);
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Whether writing (or removing) `a` could touch `b`: the same path, or one inside the other.
pub fn overlaps(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolve(a), resolve(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// An input of a command, for messages: what it is (`--data`) and where.
#[derive(Debug, Clone)]
pub struct Input {
    pub what: String,
    pub path: PathBuf,
}

impl Input {
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Input {
            what: what.into(),
            path: path.into(),
        }
    }
}

/// Refuse an output (`what`, e.g. `--output`) that is, contains or lies inside one of the
/// command's inputs: that holds even with `--overwrite`.
pub fn check_not_input(out: &Path, what: &str, inputs: &[Input]) -> Result<()> {
    for i in inputs {
        if overlaps(out, &i.path) {
            let how = if resolve(out) == resolve(&i.path) {
                "is".to_string()
            } else if resolve(&i.path).starts_with(resolve(out)) {
                "contains".to_string()
            } else {
                "is inside".to_string()
            };
            return Err(Error::file(
                out,
                format!(
                    "{what} {how} {} ({}), an input of this command; it is never written over, choose another path",
                    i.what,
                    i.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The folders of a Unix system's own layout: never an output folder (`--out /tmp
/// --overwrite` would otherwise move every user's files in `/tmp` aside and delete them).
const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/local",
    "/var",
    "/var/tmp",
];

/// Why `dir` may never be replaced or filled, whatever the flags: the root of the file system,
/// a system folder (`/tmp`, `/usr`, ...), a shared folder (the sticky bit, as `/tmp` has), a
/// mount point, the home folder, or the current directory or one above it.
pub fn protected_dir(dir: &Path) -> Option<&'static str> {
    let r = resolve(dir);
    if r.parent().is_none() {
        return Some("the root of the file system");
    }
    if SYSTEM_DIRS.iter().any(|s| r == Path::new(s)) {
        return Some("a folder of the system's own layout");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        if r == resolve(Path::new(&home)) {
            return Some("the home folder");
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        if resolve(&cwd).starts_with(&r) {
            return Some("the current directory or a folder above it");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(&r) {
            if m.is_dir() && m.mode() & 0o1000 != 0 {
                return Some("a shared folder (its sticky bit is set, as /tmp's is)");
            }
            let parent = r.parent().and_then(|p| std::fs::metadata(p).ok());
            if m.is_dir() && parent.is_some_and(|p| p.dev() != m.dev()) {
                return Some("a mount point");
            }
        }
    }
    None
}

/// An output file (`flag` names it in messages): never an input; an existing file only with
/// `overwrite`; never a folder.
pub fn check_output_file(path: &Path, flag: &str, overwrite: bool, inputs: &[Input]) -> Result<()> {
    check_not_input(path, flag, inputs)?;
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(Error::file(path, format!("{flag} is a folder, not a file")));
    }
    // Before any work: a file cannot be written into a folder that is not there.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::file(
            path,
            format!(
                "{flag}: the folder {} does not exist; create it first",
                parent.display()
            ),
        ));
    }
    if !overwrite && (path.exists() || path.is_symlink()) {
        return Err(Error::file(
            path,
            format!(
                "{flag}: the file exists; pass --overwrite to replace it, or choose another path"
            ),
        ));
    }
    // The write renames a temporary file over the path: over a device or a FIFO (`/dev/full`)
    // that would replace the node itself, even with --overwrite.
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(Error::file(
                path,
                format!("{flag}: is a device, FIFO or socket, not a regular file; refused"),
            ));
        }
    }
    Ok(())
}

/// What is in a folder, for deciding whether ferrotune may write there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirState {
    Missing,
    /// A file (or anything else) that is not a folder.
    NotADir,
    Empty,
    /// Entries (sorted), and the marker if there is one.
    Holds {
        entries: Vec<String>,
        marker: Option<Marker>,
    },
}

pub fn dir_state(dir: &Path) -> Result<DirState> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symbolic link is not a place to create a folder.
            return Ok(if dir.is_symlink() {
                DirState::NotADir
            } else {
                DirState::Missing
            });
        }
        Err(e) => return Err(Error::file(dir, e)),
    };
    if !meta.is_dir() {
        return Ok(DirState::NotADir);
    }
    let mut entries = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
        let e = e.map_err(|e| Error::file(dir, e))?;
        entries.push(e.file_name().to_string_lossy().to_string());
    }
    if entries.is_empty() {
        return Ok(DirState::Empty);
    }
    entries.sort();
    Ok(DirState::Holds {
        marker: read_marker(dir),
        entries,
    })
}

/// The marker kind of HF folders written by `convert` and `merge`.
pub const HF_FOLDER_KIND: &str = "hf_folder";

/// An output folder that is written whole (`convert --out`, `merge --out`): never an input or a
/// protected folder; an existing folder that holds anything ferrotune did not write there only
/// with `overwrite` (a folder that ferrotune wrote and nobody added to is replaced).
pub fn check_output_dir(dir: &Path, flag: &str, overwrite: bool, inputs: &[Input]) -> Result<()> {
    if let Some(why) = protected_dir(dir) {
        return Err(Error::file(
            dir,
            format!("{flag} is {why}; it is never replaced, choose a new folder"),
        ));
    }
    check_not_input(dir, flag, inputs)?;
    match dir_state(dir)? {
        DirState::Missing | DirState::Empty => Ok(()),
        DirState::NotADir => Err(Error::file(
            dir,
            format!("{flag} exists and is not a folder"),
        )),
        DirState::Holds { entries, marker } => {
            let ours = marker.as_ref().filter(|m| m.kind == HF_FOLDER_KIND);
            let foreign: Vec<&String> = entries
                .iter()
                .filter(|e| *e != MARKER_FILE && !ours.is_some_and(|m| m.files.contains(e)))
                .collect();
            if foreign.is_empty() {
                return Ok(());
            }
            // --overwrite replaces files, never a tree of someone else's: a subfolder that
            // ferrotune did not write (a `.git`, a dataset, other runs) stops it.
            if let Some(sub) = foreign.iter().find(|e| {
                let p = dir.join(e);
                p.is_dir() && !p.is_symlink()
            }) {
                return Err(Error::file(
                    dir,
                    format!(
                        "{flag} holds the folder `{sub}`, which ferrotune did not write; --overwrite replaces a folder of files only: move it away, or choose a new folder"
                    ),
                ));
            }
            if overwrite {
                return Ok(());
            }
            let what = if ours.is_some() {
                "holds files that ferrotune did not write there"
            } else {
                "is not empty and was not written by ferrotune"
            };
            Err(Error::file(
                dir,
                format!(
                    "{flag} {what} (e.g. `{}`); pass --overwrite to replace the whole folder, or choose a new one",
                    foreign[0]
                ),
            ))
        }
    }
}

/// Write the folder `dir` whole: `fill` writes the files into a temporary sibling folder, which
/// is then renamed into place (an existing `dir` is moved aside first and removed after), so a
/// kill leaves the old folder or the new one, never a half-written one. Call
/// [`check_output_dir`] first.
pub fn replace_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::file(dir, "is not a folder name that can be written"))?
        .to_string_lossy()
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, e))?;
    let tmp = parent.join(format!(".{name}.ferrotune-tmp"));
    let old = parent.join(format!(".{name}.ferrotune-old"));
    // Left by a kill: a half-written folder (ours by its marker, or still empty) goes; an old
    // folder that a kill caught between the two renames goes back into place.
    remove_if_ours(&tmp)?;
    if old.exists() {
        if dir_state(dir)? == DirState::Missing {
            std::fs::rename(&old, dir).map_err(|e| Error::file(dir, e))?;
        } else {
            remove_if_ours(&old)?;
        }
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, e))?;
    in_flight().push(tmp.clone());
    // The marker goes first, so that a half-written folder is recognisably ours.
    write_marker(&tmp, &Marker::new(HF_FOLDER_KIND, Vec::new()))?;
    let filled = fill(&tmp).and_then(|()| {
        let mut files: Vec<String> = std::fs::read_dir(&tmp)
            .map_err(|e| Error::file(&tmp, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != MARKER_FILE)
            .collect();
        files.sort();
        write_marker(&tmp, &Marker::new(HF_FOLDER_KIND, files))
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        done_in_flight(&tmp);
        return Err(e);
    }
    let placed = match dir_state(dir) {
        Err(e) => Err(e),
        // rename(2) replaces an empty folder atomically.
        Ok(DirState::Missing | DirState::Empty) => {
            std::fs::rename(&tmp, dir).map_err(|e| Error::file(dir, e))
        }
        // The replacement keeps the folder's permissions (a folder shared with a group stays
        // shared).
        Ok(_) => std::fs::metadata(dir)
            .and_then(|m| std::fs::set_permissions(&tmp, m.permissions()))
            .and_then(|()| std::fs::rename(dir, &old))
            .and_then(|()| std::fs::rename(&tmp, dir))
            .map_err(|e| Error::file(dir, e)),
    };
    // Renamed or not, it is no longer a half-written output for an interrupt to remove (a
    // failed rename leaves the finished folder for the next run to clear or restore).
    done_in_flight(&tmp);
    placed?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::file(&old, e))?;
    }
    Ok(())
}

/// Remove a leftover temporary folder of ours: one with our marker, one that a kill caught
/// while it wrote the marker, or an empty one. Anything else under that name is not ours and is
/// an error.
fn remove_if_ours(p: &Path) -> Result<()> {
    let marker_tmp = format!(".{MARKER_FILE}.");
    match dir_state(p)? {
        DirState::Missing => Ok(()),
        DirState::Empty => std::fs::remove_dir(p).map_err(|e| Error::file(p, e)),
        DirState::Holds {
            marker: Some(_), ..
        } => std::fs::remove_dir_all(p).map_err(|e| Error::file(p, e)),
        DirState::Holds { entries, .. } if entries.iter().all(|e| e.starts_with(&marker_tmp)) => {
            std::fs::remove_dir_all(p).map_err(|e| Error::file(p, e))
        }
        _ => Err(Error::file(
            p,
            "is in the way of ferrotune's temporary folder and was not written by ferrotune; move it",
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_that_is_not_utf8_is_placed_by_line_and_byte() {
        let p = tmp("not-utf8").join("rows.jsonl");
        std::fs::write(&p, b"{\"text\": \"ok\"}\n{\"text\": \"\xff bad\"}\n").unwrap();
        let e = super::read_text_limited(&p, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rows.jsonl") && e.contains("line 2, byte 25"),
            "{e}"
        );
        std::fs::write(&p, "{\"text\": \"é\"}\n").unwrap();
        assert!(super::read_text_limited(&p, 1 << 20).is_ok());
    }

    #[test]
    fn stale_temporary_files_of_dead_writers_are_cleared_and_live_ones_kept() {
        let dir = tmp("stale-tmp");
        let out = dir.join("x.gguf");
        // pid 1 always runs; no process has a pid of 2^31 - 1
        let (live, dead) = (
            dir.join(".x.gguf.1.tmp"),
            dir.join(".x.gguf.2147483647.tmp"),
        );
        let other = dir.join(".y.gguf.2147483647.tmp");
        for p in [&live, &dead, &other] {
            std::fs::write(p, b"partial").unwrap();
        }
        write_atomic(&out, b"whole").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"whole");
        assert!(!dead.exists(), "a dead writer's temporary file stays");
        assert!(live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_outputs_are_in_flight_until_renamed_or_removed() {
        // (`remove_in_flight` itself is exercised through the binary: calling it here would
        // remove the temporary files of tests running beside this one.)
        let dir = tmp("in-flight");
        let half = tmp_sibling(&dir.join("half.txt")).unwrap();
        assert!(in_flight().contains(&half));
        std::fs::write(&half, b"x").unwrap();
        rename_into_place(&half, &dir.join("half.txt")).unwrap();
        assert!(!in_flight().contains(&half));
        let failed = dir.join("no-such-folder").join("f.txt");
        assert!(write_atomic(&failed, b"x").is_err());
        assert!(!in_flight()
            .iter()
            .any(|p| p.starts_with(dir.join("no-such-folder"))));
        replace_dir(&dir.join("out"), |d| write_atomic(&d.join("a"), b"a")).unwrap();
        assert!(!in_flight().iter().any(|p| p.starts_with(&dir)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn model_folder_files_that_are_fifos_or_devices_are_refused() {
        let dir = tmp("fifo");
        let fifo = dir.join("config.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // would block forever if opened
        let e = read_to_string(&fifo).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(read_to_string(&dir).is_err());
        assert!(read_to_string("/dev/zero").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrotune-fsutil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let d = tmp("atomic");
        let p = d.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// safetensors' own temporary file is 0600: ours get the mode every other file gets.
    #[test]
    fn safetensors_files_get_the_mode_of_any_other_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("st-mode");
        let t = candle_core::Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let p = d.join("a.safetensors");
        write_safetensors(&p, &[("t".to_string(), t)].into_iter().collect()).unwrap();
        write_atomic(&d.join("b.json"), b"{}").unwrap();
        let mode = |f: &str| std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("a.safetensors"), mode("b.json"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlap_sees_through_links_and_dot_dot() {
        let d = tmp("overlap");
        std::fs::create_dir_all(d.join("model")).unwrap();
        std::fs::write(d.join("data.jsonl"), "{}").unwrap();
        std::os::unix::fs::symlink(d.join("data.jsonl"), d.join("link.jsonl")).unwrap();
        assert!(overlaps(&d.join("link.jsonl"), &d.join("data.jsonl")));
        assert!(overlaps(
            &d.join("model/../data.jsonl"),
            &d.join("data.jsonl")
        ));
        assert!(overlaps(&d.join("model/new/file"), &d.join("model")));
        assert!(overlaps(&d, &d.join("model")));
        assert!(!overlaps(&d.join("other.jsonl"), &d.join("data.jsonl")));
        assert!(!overlaps(&d.join("model2"), &d.join("model")));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replace_dir_swaps_whole_folders_and_cleans_up_after_a_kill() {
        let d = tmp("replace");
        let out = d.join("out");
        replace_dir(&out, |t| write_atomic(&t.join("a"), b"1")).unwrap();
        assert_eq!(read_marker(&out).unwrap().files, vec!["a".to_string()]);
        // Ours and untouched: replaced without --overwrite.
        check_output_dir(&out, "--out", false, &[]).unwrap();
        // What a kill mid-write leaves: a temporary folder of ours.
        std::fs::create_dir_all(d.join(".out.ferrotune-tmp")).unwrap();
        write_marker(
            &d.join(".out.ferrotune-tmp"),
            &Marker::new(HF_FOLDER_KIND, vec![]),
        )
        .unwrap();
        replace_dir(&out, |t| write_atomic(&t.join("b"), b"2")).unwrap();
        assert!(!out.join("a").exists() && out.join("b").exists());
        assert!(!d.join(".out.ferrotune-tmp").exists() && !d.join(".out.ferrotune-old").exists());
        // A failing fill leaves the old folder as it was.
        assert!(replace_dir(&out, |_| Err(Error::msg("disk full"))).is_err());
        assert!(out.join("b").exists() && !d.join(".out.ferrotune-tmp").exists());
        // A file the user added: only with --overwrite.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = check_output_dir(&out, "--out", false, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("notes.txt") && e.contains("--overwrite"), "{e}");
        check_output_dir(&out, "--out", true, &[]).unwrap();
        // A replaced folder keeps its permissions.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o750)).unwrap();
            replace_dir(&out, |t| write_atomic(&t.join("c"), b"3")).unwrap();
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o750);
        }
        // A subfolder someone else put there: not even with --overwrite.
        std::fs::create_dir_all(out.join(".git/objects")).unwrap();
        for overwrite in [false, true] {
            let e = check_output_dir(&out, "--out", overwrite, &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("`.git`") && e.contains("did not write"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// System folders, shared (sticky) folders and the root are never an output folder,
    /// `--overwrite` or not; a plain folder below them is.
    #[test]
    fn system_and_shared_folders_are_never_outputs() {
        for dir in ["/", "/tmp", "/usr", "/var/tmp", "/etc/", "/tmp/../usr"] {
            for overwrite in [false, true] {
                let e = check_output_dir(Path::new(dir), "--out", overwrite, &[])
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("never replaced"), "{dir}: {e}");
            }
        }
        let d = tmp("sticky");
        let shared = d.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(shared.join("someone.txt"), "theirs").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
            let e = check_output_dir(&shared, "--out", true, &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains("sticky"), "{e}");
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        check_output_dir(&shared, "--out", true, &[]).unwrap();
        check_output_dir(&d.join("new"), "--out", false, &[]).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn inputs_that_are_not_files_are_refused_before_any_read() {
        let d = tmp("inputs");
        // a device never ends: refused at once, not read until memory runs out
        let e = read_input_text(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero") && e.contains("device"), "{e}");
        let e = read_input_text(&d).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        // a FIFO in a model folder would block its opener until a writer came
        let fifo = d.join("model.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let e = open_regular(&fifo).unwrap_err().to_string();
            assert!(e.contains("model.safetensors") && e.contains("FIFO"), "{e}");
            assert!(check_regular(&fifo).is_err());
        }
        // invalid UTF-8 names its line
        let bad = d.join("bad.jsonl");
        std::fs::write(&bad, b"{\"a\": 1}\n{\"a\": \"\xff\"}\n").unwrap();
        let e = read_input_text(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
        let good = d.join("good.txt");
        std::fs::write(&good, "one\ntwo\n").unwrap();
        assert_eq!(read_input_text(&good).unwrap(), "one\ntwo\n");
        assert!(open_regular(&good).is_ok());
        // an output over a device is refused even with --overwrite (the rename would replace
        // the device node)
        let e = check_output_file(Path::new("/dev/null"), "--output", true, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/null") && e.contains("not a regular file"),
            "{e}"
        );
        check_output_file(&good, "--output", true, &[]).unwrap();
        // procfs reports a size of 0 for files that hold text: they are read, not seen empty
        #[cfg(target_os = "linux")]
        {
            let status = read_input_text(Path::new("/proc/self/status")).unwrap();
            assert!(status.contains("Pid:"), "{status}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
