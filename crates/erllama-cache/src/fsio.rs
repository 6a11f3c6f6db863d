//! File primitives for the `ram_file` and `disk` tiers (docs/tiers.md
//! steps 2 and 4): private directories, exclusive temp writes, the
//! create-if-absent link with adopt-or-replace, the startup scan, plain
//! reads and the advisory hit-count update. No index lives here; the meta
//! index calls these.
//!
//! Decisions the spec leaves open:
//!
//! - A tier directory must prove it can hold the tier before anything is
//!   scanned ([`prepare_dir`]): it is created (0700) or made private (group
//!   and other bits cleared), and a probe file is created, written, synced
//!   and removed in it. A path under `/proc` or `/sys`, a read-only
//!   directory or a regular file fails here, with the step that failed,
//!   instead of failing every save later.
//! - A directory with the sticky bit (`/tmp`, `/dev/shm` themselves) is
//!   refused rather than made private: a chmod there would lock every other
//!   user of the machine out of it.
//! - The startup scan deletes `*.tmp` and every `*.kvc` file that fails the
//!   meta parse or whose name is not `<recomputed key hex>.kvc`. Files with
//!   any other name (e.g. `notes.txt`) are left alone: the directory may be
//!   shared with things the cache does not own.
//! - Tier files are never reached through a symbolic link and never opened
//!   unless they are regular files: every open uses `O_NOFOLLOW` and
//!   checks the opened descriptor's type, so a link planted at `<key>.kvc`
//!   cannot make the cache register, read or write a file outside the tier,
//!   and a FIFO cannot hang it (`O_NONBLOCK`). The scan removes a `*.kvc` or
//!   `*.tmp` entry that is a symlink or another non-regular file (the entry
//!   itself: unlink does not follow links), logs it and reports it as
//!   invalid; a subdirectory is left alone.
//! - Hit counts are advisory: [`write_hit_count`] does not sync, and the
//!   CRC covers only the payload, so a lost update never invalidates a file.

use std::fs::{self, DirBuilder, File, FileType, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::key::CacheKey;
use crate::kvc::{
    encode_hit_count, header_len, parse_full, parse_meta_with_len, KvcMeta, HEADER_FIXED_LEN,
    HIT_COUNT_OFFSET,
};

/// Extension of a published tier file.
const KVC_EXT: &str = ".kvc";
/// Extension of a temp file (deleted on start).
const TMP_EXT: &str = ".tmp";

/// Process-wide counter making temp names unique within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An I/O failure of a tier file operation, with what was being done and
/// to which path.
#[derive(Debug, thiserror::Error)]
pub enum FsioError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation (`"link"`, `"read_dir"`, …).
        op: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The directory cannot hold a tier ([`ensure_dir`]).
    #[error("directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: DirError,
    },
}

impl FsioError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        FsioError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The underlying I/O error, if an I/O call failed.
    #[must_use]
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            FsioError::Io { source, .. } => Some(source),
            FsioError::Dir { source, .. } => source.io_error(),
        }
    }
}

/// Why a directory cannot hold a file tier ([`ensure_dir`],
/// [`prepare_dir`]).
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The path exists and is not a directory (or a link to one).
    #[error("not a directory")]
    NotADirectory,
    /// The directory has the sticky bit: a directory shared by every user
    /// (`/tmp`, `/dev/shm`), which must not be made private.
    #[error("shared sticky directory (mode {mode:04o}); use a private subdirectory of it")]
    Shared {
        /// Its permission bits.
        mode: u32,
    },
    /// A step failed: `"stat"`, `"create"` or `"chmod"` of the directory;
    /// `"create probe file"`, `"write probe file"`, `"fsync probe file"` or
    /// `"remove probe file"`; `"probe file name"` for a bad writer name.
    #[error("{op}: {source}")]
    Io {
        /// The step.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl DirError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| DirError::Io { op, source }
    }

    /// The underlying I/O error, if a step failed.
    #[must_use]
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            DirError::Io { source, .. } => Some(source),
            DirError::NotADirectory | DirError::Shared { .. } => None,
        }
    }
}

/// A tier path that is a symbolic link or another non-regular file (FIFO,
/// socket, device, directory): never opened as a tier file. Carried inside
/// the [`io::Error`] of [`read_file`], [`read_header`] and
/// [`write_hit_count`]; [`not_regular`] finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a regular file ({kind})")]
pub struct NotRegularFile {
    /// What it is instead: `"symbolic link"`, `"FIFO"`, ….
    pub kind: &'static str,
}

impl From<NotRegularFile> for io::Error {
    fn from(e: NotRegularFile) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// The [`NotRegularFile`] inside `e`, if `e` says the path was a symlink or
/// another non-regular file.
#[must_use]
pub fn not_regular(e: &io::Error) -> Option<NotRegularFile> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NotRegularFile>())
        .copied()
}

/// What a non-regular directory entry is, for messages.
fn file_kind(t: FileType) -> &'static str {
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Opens an existing tier file for reading (or, with `write`, for writing)
/// only if it is a regular file reached without a symbolic link:
/// `O_NOFOLLOW` refuses a link in the last component (a link in the
/// directory path itself is the configuration's choice), `O_NONBLOCK`
/// keeps a FIFO from blocking the open (it changes nothing for regular
/// files), and `fstat` on the opened descriptor decides, so the check and
/// the use are the same inode.
pub(crate) fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let opened = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) => {
            // A symlink gives ELOOP on Linux (other errnos elsewhere), a
            // FIFO without a reader ENXIO on a write open: name what is
            // there instead of the errno.
            return match fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_file() => Err(NotRegularFile {
                    kind: file_kind(m.file_type()),
                }
                .into()),
                _ => Err(e),
            };
        }
    };
    let file_type = file.metadata()?.file_type();
    if !file_type.is_file() {
        return Err(NotRegularFile {
            kind: file_kind(file_type),
        }
        .into());
    }
    Ok(file)
}

/// The final path of `key`'s file in a tier directory:
/// `<dir>/<64 lowercase hex>.kvc`.
#[must_use]
pub fn final_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{key}{KVC_EXT}"))
}

/// An exclusive `flock` on a tier directory itself (no lock file), which
/// the saves of every process over that directory take in turn to hold its
/// quota; released on drop (or when the process dies).
#[derive(Debug)]
pub struct DirLock(File);

impl DirLock {
    /// Blocks until this process holds the directory's lock.
    ///
    /// # Errors
    ///
    /// Opening the directory or `flock`.
    pub fn acquire(dir: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir)?;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self(file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: unlocking the descriptor this lock owns (closing it would
        // release the lock too).
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// One published row file of a tier directory.
#[derive(Debug, Clone)]
pub struct DirFile {
    /// The key its name gives.
    pub key: CacheKey,
    /// Its length in bytes.
    pub size: u64,
    /// Its last modification (a hit rewrites the hit count, so this is
    /// about the last use).
    pub modified: std::time::SystemTime,
}

/// The `<key>.kvc` regular files of `dir` (temp files and anything else
/// are left out; a file that vanishes meanwhile is skipped).
///
/// # Errors
///
/// Listing the directory.
pub fn list_rows(dir: &Path) -> io::Result<Vec<DirFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(KVC_EXT)) else {
            continue;
        };
        let Ok(key) = CacheKey::from_hex(hex) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        out.push(DirFile {
            key,
            size: meta.len(),
            modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        });
    }
    Ok(out)
}

/// Makes `dir` a private tier directory: creates it (and missing parents)
/// with mode 0o700 when it is missing, and takes every group and other
/// permission (and the set-id bits) away from an existing one, so a
/// 0o777 directory becomes 0o700: a tier directory others can read or
/// write would let them read cached state or plant files. The owner's own
/// bits are kept: an owner who made the directory read-only (0o500) gets
/// a directory [`prepare_dir`] refuses, not one silently made writable
/// again. A symbolic link to a directory is followed: where the directory
/// lives is the configuration's choice.
///
/// # Errors
///
/// [`DirError::NotADirectory`] when the path is something else,
/// [`DirError::Shared`] for a sticky directory such as `/tmp` (never
/// chmodded), [`DirError::Io`] when a stat, the creation or the chmod fails.
pub fn ensure_dir(dir: &Path) -> Result<(), DirError> {
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(DirError::io("create"))?;
            fs::metadata(dir).map_err(DirError::io("stat"))?
        }
        Err(e) => return Err(DirError::io("stat")(e)),
    };
    if !meta.is_dir() {
        return Err(DirError::NotADirectory);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o1000 != 0 {
        return Err(DirError::Shared { mode });
    }
    let private = mode & 0o700;
    if private != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(private))
            .map_err(DirError::io("chmod"))?;
    }
    Ok(())
}

/// Contents of the probe file: a few bytes are enough to need a free block.
const PROBE_BYTES: &[u8] = b"erllama tier probe\n";

/// Proves that a file tier can work in `dir` ([`ensure_dir`] first): a
/// probe file `probe.<writer>.<unique>.tmp` is created exclusively (0o600),
/// written, synced and removed, the same calls a save makes. A probe left
/// by a crash is a `*.tmp` file, deleted by the next scan.
///
/// # Errors
///
/// [`DirError`] from [`ensure_dir`], or [`DirError::Io`] naming the probe
/// step that failed (`"create probe file"`, …); a probe file that was
/// created is removed on every error. [`io::ErrorKind::InvalidInput`]
/// (as [`DirError::Io`]) for a writer name with `/` or NUL.
pub fn prepare_dir(dir: &Path, writer: &str) -> Result<(), DirError> {
    ensure_dir(dir)?;
    check_writer(writer).map_err(DirError::io("probe file name"))?;
    let probe = dir.join(format!("probe.{writer}.{}{TMP_EXT}", unique_suffix()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(DirError::io("create probe file"))?;
    let mut guard = RemoveOnDrop(Some(probe));
    file.write_all(PROBE_BYTES)
        .map_err(DirError::io("write probe file"))?;
    file.sync_all().map_err(DirError::io("fsync probe file"))?;
    drop(file);
    let probe = guard.0.take().expect("set above");
    match fs::remove_file(&probe) {
        // Another process's startup scan deletes `*.tmp` files: it removed
        // the probe first, which proves the same.
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DirError::io("remove probe file")(e)),
        _ => Ok(()),
    }
}

/// Removes a file on drop unless taken: partial temp and probe files never
/// outlive an error or an unwinding probe.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

fn check_writer(writer: &str) -> io::Result<()> {
    if writer.is_empty() || writer.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad writer name {writer:?}"),
        ));
    }
    Ok(())
}

/// `<pid>-<process-wide counter>-<nanoseconds>`: unique among the temp
/// names of every process sharing a directory.
/// The pid in a temp file's name (`...<pid>-<counter>-<nanos>.tmp`, see
/// [`unique_suffix`]).
fn temp_owner(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(TMP_EXT)?;
    let unique = stem.rsplit('.').next()?;
    let mut parts = unique.split('-');
    let pid = parts.next()?.parse().ok()?;
    // The counter and the nanoseconds must follow: only names this crate
    // makes are read this way.
    (parts.next()?.parse::<u64>().is_ok() && parts.next()?.parse::<u128>().is_ok()).then_some(pid)
}

/// Whether process `pid` exists (signal 0: nothing is sent).
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `header` then `payload` to a fresh temp file next to `key`'s
/// final path, named `<hex>.kvc.<writer>.<unique>.tmp` (unique = pid,
/// process-wide counter, nanoseconds), created exclusively with mode 0o600,
/// and syncs it to stable storage. Returns the temp path. On any error the
/// partial temp file is removed.
///
/// # Errors
///
/// [`io::ErrorKind::InvalidInput`] when `writer` is empty or contains `/`
/// or NUL; otherwise any error of create, write or sync.
pub fn write_temp(
    dir: &Path,
    key: &CacheKey,
    writer: &str,
    header: &[u8],
    payload: &[u8],
) -> io::Result<PathBuf> {
    write_temp_probed(dir, key, writer, header, payload, &|| {})
}

/// [`write_temp`] calling `between` after the header is written and before
/// the payload (crash tests kill a writer there).
///
/// # Errors
///
/// As [`write_temp`].
pub fn write_temp_probed(
    dir: &Path,
    key: &CacheKey,
    writer: &str,
    header: &[u8],
    payload: &[u8],
    between: &dyn Fn(),
) -> io::Result<PathBuf> {
    check_writer(writer)?;
    let temp = dir.join(format!(
        "{key}{KVC_EXT}.{writer}.{}{TMP_EXT}",
        unique_suffix()
    ));
    // create_new (O_EXCL) never follows a symlink: a link planted under the
    // temp name makes the create fail instead of writing through it.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    // Removes the partial temp file on an error and on unwinding out of
    // `between`.
    let mut guard = RemoveOnDrop(Some(temp));
    file.write_all(header)?;
    between();
    file.write_all(payload)?;
    file.sync_all()?;
    drop(file);
    Ok(guard.0.take().expect("set above"))
}

/// What [`link_into_place`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// The final path was absent; the temp file is now the final file.
    Linked,
    /// A valid file for the key was already there; it was kept (the
    /// existing bytes win) and the temp file removed.
    AdoptedExisting,
    /// An invalid file was there; the temp file atomically replaced it.
    ReplacedInvalid,
}

fn sync_dir_of(path: &Path) -> Result<(), FsioError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsioError::io("sync_dir", dir, e))
}

/// docs/tiers.md, publish step 4: hard-links `temp` to `final_path` (atomic
/// create-if-absent), then removes `temp` and syncs the directory. When
/// `final_path` exists it is never ignored: it is read (never through a
/// symlink) and fully parsed against `expected`; a valid regular file is
/// adopted (temp removed), anything else (invalid, unreadable, a symlink,
/// a FIFO) is replaced once by renaming `temp` over the entry (atomic; the
/// rename replaces a link itself, not its target) and syncing the
/// directory.
///
/// # Errors
///
/// [`FsioError::Io`] for a failed link (other than "exists"), rename,
/// temp removal after a link, or directory sync. The temp file is removed
/// on a failed link or rename; after a failed directory sync the final
/// file is in place but may not be durable.
pub fn link_into_place(
    temp: &Path,
    final_path: &Path,
    expected: &CacheKey,
) -> Result<LinkOutcome, FsioError> {
    match fs::hard_link(temp, final_path) {
        Ok(()) => {
            fs::remove_file(temp).map_err(|e| FsioError::io("remove_temp", temp, e))?;
            sync_dir_of(final_path)?;
            Ok(LinkOutcome::Linked)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let valid = match read_file(final_path) {
                Ok(bytes) => parse_full(&bytes, expected).is_ok(),
                Err(e) => {
                    if let Some(nr) = not_regular(&e) {
                        tracing::warn!(
                            path = %final_path.display(),
                            kind = nr.kind,
                            "not a regular file at a tier file's name: replaced, not adopted"
                        );
                    }
                    false
                }
            };
            if valid {
                fs::remove_file(temp).map_err(|e| FsioError::io("remove_temp", temp, e))?;
                return Ok(LinkOutcome::AdoptedExisting);
            }
            if let Err(e) = fs::rename(temp, final_path) {
                let _ = fs::remove_file(temp);
                return Err(FsioError::io("rename", final_path, e));
            }
            sync_dir_of(final_path)?;
            Ok(LinkOutcome::ReplacedInvalid)
        }
        Err(e) => {
            let _ = fs::remove_file(temp);
            Err(FsioError::io("link", final_path, e))
        }
    }
}

/// One file registered by [`scan_dir`]: key recomputed from its contents,
/// path, parsed header and file length in bytes.
pub type ScannedFile = (CacheKey, PathBuf, KvcMeta, u64);

/// What a startup [`scan_dir`] found and did.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Files that passed the meta parse under their recomputed key's name.
    pub registered: Vec<ScannedFile>,
    /// Number of `*.tmp` files deleted.
    pub removed_tmp: usize,
    /// `*.tmp` files left alone: a save in flight of another live process.
    pub kept_tmp: usize,
    /// `*.kvc` files deleted as invalid, with why.
    pub removed_invalid: Vec<(PathBuf, String)>,
}

/// Reads just the header of a KVC file and meta-parses it with the file's
/// length (no CRC, no key check: see [`parse_full`] for those). Used by
/// the startup scan and by inspection tools. Only a regular file is
/// opened, never through a symlink.
///
/// # Errors
///
/// A message naming the I/O or framing error (`open: not a regular file
/// (symbolic link)` for a link).
pub fn read_header(path: &Path) -> Result<(KvcMeta, u64), String> {
    let mut file = open_regular(path, false).map_err(|e| format!("open: {e}"))?;
    let len = file.metadata().map_err(|e| format!("metadata: {e}"))?.len();
    let fixed_len = usize::try_from(len.min(HEADER_FIXED_LEN as u64)).unwrap_or(0);
    let mut header = vec![0u8; fixed_len];
    file.read_exact(&mut header)
        .map_err(|e| format!("read: {e}"))?;
    let total = header_len(&header).map_err(|e| e.to_string())?;
    // Never allocate more than the file holds; the parse reports the rest.
    let rest = total.min(len).saturating_sub(header.len() as u64);
    file.take(rest)
        .read_to_end(&mut header)
        .map_err(|e| format!("read: {e}"))?;
    let meta = parse_meta_with_len(&header, len).map_err(|e| e.to_string())?;
    Ok((meta, len))
}

fn remove_quiet(path: &Path) -> Result<(), FsioError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FsioError::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// docs/tiers.md start of a file tier: makes `dir` a private directory
/// ([`ensure_dir`]), deletes `*.tmp`, registers every `*.kvc` regular file
/// that passes the meta parse and is named after the key recomputed from
/// its contents, and deletes every other `*.kvc` file (listing it with its
/// error). A `*.kvc` or `*.tmp` entry that is a symlink or another
/// non-regular file is never opened: the entry itself is removed, logged at
/// WARN and listed as invalid. Other names and subdirectories are left
/// alone (see the module docs).
///
/// # Errors
///
/// [`FsioError::Dir`] when the directory cannot be created or made
/// private; [`FsioError::Io`] when it cannot be listed or an entry to
/// delete cannot be removed.
pub fn scan_dir(dir: &Path) -> Result<ScanReport, FsioError> {
    ensure_dir(dir).map_err(|source| FsioError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut report = ScanReport::default();
    let entries = fs::read_dir(dir).map_err(|e| FsioError::io("read_dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FsioError::io("read_dir", dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue; // Not UTF-8: not a name this crate writes.
        };
        if !name.ends_with(TMP_EXT) && !name.ends_with(KVC_EXT) {
            continue;
        }
        // DirEntry::file_type does not follow symlinks (and, from the
        // directory listing, opens nothing: a FIFO cannot block the scan).
        let file_type = entry
            .file_type()
            .map_err(|e| FsioError::io("file_type", &path, e))?;
        if file_type.is_dir() {
            tracing::warn!(
                path = %path.display(),
                "subdirectory with a tier file's name left alone"
            );
            continue;
        }
        if !file_type.is_file() {
            let kind = file_kind(file_type);
            tracing::warn!(
                path = %path.display(),
                kind,
                "not a regular file in a tier directory: removed, not adopted"
            );
            remove_quiet(&path)?;
            report
                .removed_invalid
                .push((path, format!("not a regular file ({kind})")));
            continue;
        }
        if name.ends_with(TMP_EXT) {
            // Another live process's save in flight (its pid is in the
            // name) is left to finish: the directory may be shared.
            if temp_owner(name).is_some_and(|pid| pid != std::process::id() && alive(pid)) {
                report.kept_tmp += 1;
                continue;
            }
            remove_quiet(&path)?;
            report.removed_tmp += 1;
            continue;
        }
        if !name.ends_with(KVC_EXT) {
            continue;
        }
        let checked = read_header(&path).and_then(|(meta, len)| {
            let key = meta.key();
            let want = format!("{key}{KVC_EXT}");
            if name == want {
                Ok((key, meta, len))
            } else {
                Err(format!("file name {name} does not match key {key}"))
            }
        });
        match checked {
            Ok((key, meta, len)) => report.registered.push((key, path, meta, len)),
            Err(why) => {
                remove_quiet(&path)?;
                report.removed_invalid.push((path, why));
            }
        }
    }
    Ok(report)
}

/// Reads a whole tier file: a regular file, never through a symlink.
///
/// # Errors
///
/// Any error of the open or read; a symlink or other non-regular file is
/// an error carrying [`NotRegularFile`] (see [`not_regular`]).
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open_regular(path, false)?;
    let len = file.metadata()?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Overwrites the hit count (4 bytes little-endian at offset 12) of an
/// existing KVC file in place. Not synced: hit counts are advisory and
/// outside the CRC, so a lost update is harmless. Never written through a
/// symlink, nor into anything but a regular file.
///
/// # Errors
///
/// Any error of opening or writing the file; a symlink or other
/// non-regular file is an error carrying [`NotRegularFile`].
pub fn write_hit_count(path: &Path, hits: u32) -> io::Result<()> {
    let file = open_regular(path, true)?;
    file.write_all_at(&encode_hit_count(hits), HIT_COUNT_OFFSET as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvc::build_header;
    use std::os::unix::fs::PermissionsExt;

    use crate::kvc::tests::{input, key_of};

    /// (key, header, payload) for `tokens`.
    fn parts(tokens: &[u32], payload: &[u8]) -> (CacheKey, Vec<u8>) {
        (
            key_of(tokens),
            build_header(&input(tokens, "hi"), payload).expect("build"),
        )
    }

    /// The pid of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    #[test]
    fn the_scan_leaves_a_live_process_s_temp_files_alone() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("tier");
        ensure_dir(&dir).expect("dir");
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let theirs = dir.join(format!("k.kvc.w.{}-1-2.tmp", live.id()));
        let dead = dir.join(format!("k.kvc.w.{}-1-2.tmp", dead_pid()));
        let mine = dir.join(format!("k.kvc.w.{}-1-2.tmp", std::process::id()));
        let odd = dir.join("k.kvc.w.12-x.tmp");
        for p in [&theirs, &dead, &mine, &odd] {
            fs::write(p, b"partial").expect("w");
        }
        let report = scan_dir(&dir).expect("scan");
        assert_eq!((report.kept_tmp, report.removed_tmp), (1, 3));
        assert!(theirs.exists());
        assert!(!dead.exists() && !mine.exists() && !odd.exists());
        live.kill().expect("kill");
        live.wait().expect("wait");
        let report = scan_dir(&dir).expect("scan");
        assert_eq!((report.kept_tmp, report.removed_tmp), (0, 1));
        assert!(!theirs.exists());
    }

    fn whole(tokens: &[u32], payload: &[u8]) -> (CacheKey, Vec<u8>) {
        let (key, mut f) = parts(tokens, payload);
        f.extend_from_slice(payload);
        (key, f)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("meta").permissions().mode() & 0o777
    }

    fn count_tmp(dir: &Path) -> usize {
        fs::read_dir(dir)
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count()
    }

    #[test]
    fn write_and_link() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("a/b");
        ensure_dir(&dir).expect("dir");
        assert_eq!(mode(&dir), 0o700);
        let (key, header) = parts(&[1, 2, 3], b"payload!");
        let temp = write_temp(&dir, &key, "w1", &header, b"payload!").expect("temp");
        let tname = temp
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(tname.starts_with(&format!("{key}.kvc.w1.")) && tname.ends_with(".tmp"));
        assert_eq!(mode(&temp), 0o600);
        let fin = final_path(&dir, &key);
        assert_eq!(fin, dir.join(format!("{}.kvc", key.to_hex())));
        assert_eq!(
            link_into_place(&temp, &fin, &key).expect("link"),
            LinkOutcome::Linked
        );
        assert!(!temp.exists());
        assert_eq!(mode(&fin), 0o600);
        let meta = parse_full(&read_file(&fin).expect("read"), &key).expect("valid");
        assert_eq!(meta.tokens, vec![1, 2, 3]);
        assert_eq!(count_tmp(&dir), 0);
    }

    #[test]
    fn bad_writer_name_rejected() {
        let root = tempfile::tempdir().expect("tmp");
        let (key, header) = parts(&[1], b"p");
        for w in ["", "a/b"] {
            let err = write_temp(root.path(), &key, w, &header, b"p").expect_err("bad");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(count_tmp(root.path()), 0);
    }

    #[test]
    fn temp_names_are_unique() {
        let root = tempfile::tempdir().expect("tmp");
        let (key, header) = parts(&[1], b"p");
        let a = write_temp(root.path(), &key, "w", &header, b"p").expect("a");
        let b = write_temp(root.path(), &key, "w", &header, b"p").expect("b");
        assert_ne!(a, b);
    }

    #[test]
    fn adopt_existing_valid() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path();
        let (key, existing) = whole(&[1, 2, 3], b"payload!");
        let fin = final_path(dir, &key);
        fs::write(&fin, &existing).expect("write");
        // Same key, different (valid) payload: the existing bytes win.
        let (_, header) = parts(&[1, 2, 3], b"other payload");
        let temp = write_temp(dir, &key, "w2", &header, b"other payload").expect("temp");
        assert_eq!(
            link_into_place(&temp, &fin, &key).expect("link"),
            LinkOutcome::AdoptedExisting
        );
        assert!(!temp.exists());
        assert_eq!(fs::read(&fin).expect("read"), existing);
    }

    #[test]
    fn replace_corrupt_existing() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path();
        let (key, mut corrupt) = whole(&[1, 2, 3], b"payload!");
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xFF;
        let fin = final_path(dir, &key);
        fs::write(&fin, &corrupt).expect("write");
        let (_, header) = parts(&[1, 2, 3], b"payload!");
        let temp = write_temp(dir, &key, "w3", &header, b"payload!").expect("temp");
        assert_eq!(
            link_into_place(&temp, &fin, &key).expect("link"),
            LinkOutcome::ReplacedInvalid
        );
        assert!(!temp.exists());
        parse_full(&fs::read(&fin).expect("read"), &key).expect("valid now");
    }

    #[test]
    fn scan_cleans_and_registers() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("tier");
        // Missing directory is created.
        let empty = scan_dir(&dir).expect("scan empty");
        assert!(empty.registered.is_empty());
        assert_eq!(mode(&dir), 0o700);

        let (good_key, good) = whole(&[1, 2, 3], b"payload!");
        fs::write(final_path(&dir, &good_key), &good).expect("w");

        let (k, f) = whole(&[4], b"truncated payload");
        fs::write(final_path(&dir, &k), &f[..f.len() - 3]).expect("w");
        let (k, mut f) = whole(&[5], b"appended");
        f.extend_from_slice(b"xx");
        fs::write(final_path(&dir, &k), &f).expect("w");
        fs::write(final_path(&dir, &key_of(&[6])), b"").expect("w");
        let (_, f) = whole(&[7], b"renamed");
        fs::write(final_path(&dir, &key_of(&[8])), &f).expect("w");
        fs::write(dir.join("junk.kvc"), b"not a kvc file at all").expect("w");
        let dead = dead_pid();
        fs::write(
            dir.join(format!("{good_key}.kvc.w.{dead}-2-3.tmp")),
            b"partial",
        )
        .expect("w");
        fs::write(dir.join("x.tmp"), b"").expect("w");
        fs::write(dir.join("notes.txt"), b"keep me").expect("w");
        // A link to a valid file, under its key's name: removed, not
        // followed. Links and subdirectories with other names stay.
        let (linked_key, linked) = whole(&[9], b"outside");
        let outside = root.path().join("outside.kvc");
        fs::write(&outside, &linked).expect("w");
        std::os::unix::fs::symlink(&outside, final_path(&dir, &linked_key)).expect("symlink");
        std::os::unix::fs::symlink(&outside, dir.join("y.tmp")).expect("symlink");
        std::os::unix::fs::symlink(dir.join("notes.txt"), dir.join("notes.link")).expect("symlink");
        fs::create_dir(dir.join("sub.kvc")).expect("subdir");

        let report = scan_dir(&dir).expect("scan");
        assert_eq!(report.removed_tmp, 2);
        assert_eq!(report.registered.len(), 1);
        let (key, path, meta, len) = &report.registered[0];
        assert_eq!(*key, good_key);
        assert_eq!(*path, final_path(&dir, &good_key));
        assert_eq!(meta.tokens, vec![1, 2, 3]);
        assert_eq!(*len, good.len() as u64);
        assert_eq!(
            report.removed_invalid.len(),
            7,
            "{:?}",
            report.removed_invalid
        );
        for (p, why) in &report.removed_invalid {
            assert!(
                fs::symlink_metadata(p).is_err(),
                "{} still there",
                p.display()
            );
            assert!(!why.is_empty());
        }
        let links = report
            .removed_invalid
            .iter()
            .filter(|(_, why)| why == "not a regular file (symbolic link)")
            .count();
        assert_eq!(links, 2);
        assert_eq!(fs::read(dir.join("notes.txt")).expect("notes"), b"keep me");
        // The link's target is untouched.
        assert_eq!(fs::read(&outside).expect("outside"), linked);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let good_name = format!("{good_key}.kvc");
        assert_eq!(
            names,
            [good_name.as_str(), "notes.link", "notes.txt", "sub.kvc"],
        );
    }

    #[test]
    fn ensure_dir_makes_existing_directories_private() {
        let root = tempfile::tempdir().expect("tmp");
        for (before, after) in [
            (0o777, 0o700),
            (0o2750, 0o700),
            (0o755, 0o700),
            (0o500, 0o500),
        ] {
            let dir = root.path().join(format!("d{before:o}"));
            fs::create_dir(&dir).expect("mkdir");
            fs::set_permissions(&dir, fs::Permissions::from_mode(before)).expect("chmod");
            ensure_dir(&dir).expect("ensure");
            assert_eq!(mode(&dir), after, "{before:o}");
        }
        // A shared sticky directory (like /tmp) is refused, not chmodded.
        let shared = root.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
        let err = ensure_dir(&shared).expect_err("sticky");
        assert!(matches!(err, DirError::Shared { mode: 0o1777 }), "{err}");
        let m = fs::metadata(&shared).expect("meta").permissions().mode() & 0o7777;
        assert_eq!(m, 0o1777);
        // A file in place of the directory.
        let file = root.path().join("file");
        fs::write(&file, b"x").expect("w");
        assert!(matches!(ensure_dir(&file), Err(DirError::NotADirectory)));
        assert!(matches!(
            prepare_dir(&file, "w"),
            Err(DirError::NotADirectory)
        ));
        // Below a file: the stat fails (ENOTDIR).
        let err = ensure_dir(&file.join("sub")).expect_err("below a file");
        assert!(matches!(err, DirError::Io { op: "stat", .. }), "{err}");
    }

    #[test]
    fn prepare_dir_probes_and_leaves_nothing() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("a/b");
        prepare_dir(&dir, "w1").expect("prepare");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(fs::read_dir(&dir).expect("ls").count(), 0);
        let err = prepare_dir(&dir, "a/b").expect_err("bad writer");
        assert!(matches!(
            err,
            DirError::Io {
                op: "probe file name",
                ..
            }
        ));
        // Nothing the kernel lets anyone create files in.
        for bad in [
            "/proc/erllama-no-such-dir/tier",
            "/sys/erllama-no-such-dir/tier",
        ] {
            let err = prepare_dir(Path::new(bad), "w1").expect_err(bad);
            assert!(matches!(err, DirError::Io { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn tier_files_are_never_opened_through_links_or_as_fifos() {
        let root = tempfile::tempdir().expect("tmp");
        let (key, bytes) = whole(&[1, 2, 3], b"payload!");
        let outside = root.path().join("outside.kvc");
        fs::write(&outside, &bytes).expect("w");
        let link = final_path(root.path(), &key);
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let kind = |e: io::Error| not_regular(&e).map(|n| n.kind);
        assert_eq!(
            kind(write_hit_count(&link, 7).expect_err("link")),
            Some("symbolic link")
        );
        assert_eq!(
            kind(read_file(&link).expect_err("link")),
            Some("symbolic link")
        );
        assert!(read_header(&link)
            .expect_err("link")
            .contains("symbolic link"));
        assert_eq!(fs::read(&outside).expect("outside"), bytes);

        let fifo = root.path().join("fifo.kvc");
        mkfifo(&fifo);
        // O_NONBLOCK: neither open blocks waiting for the other end.
        assert_eq!(kind(read_file(&fifo).expect_err("fifo")), Some("FIFO"));
        assert_eq!(
            kind(write_hit_count(&fifo, 7).expect_err("fifo")),
            Some("FIFO")
        );
        // A link at the final name is replaced (the link itself), never
        // adopted or written through.
        let (_, header) = parts(&[1, 2, 3], b"payload!");
        let temp = write_temp(root.path(), &key, "w", &header, b"payload!").expect("temp");
        assert_eq!(
            link_into_place(&temp, &link, &key).expect("link"),
            LinkOutcome::ReplacedInvalid
        );
        assert!(fs::symlink_metadata(&link).expect("meta").is_file());
        assert_eq!(fs::read(&outside).expect("outside"), bytes);
    }

    /// Makes a FIFO at `path`.
    pub(crate) fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: `c` is a valid NUL-terminated string that outlives the
        // call; mkfifo only reads it.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", io::Error::last_os_error());
    }

    #[test]
    fn hit_count_in_place() {
        let root = tempfile::tempdir().expect("tmp");
        let (key, before) = whole(&[1, 2, 3], b"payload!");
        let fin = final_path(root.path(), &key);
        fs::write(&fin, &before).expect("w");
        write_hit_count(&fin, 0xDEAD_BEEF).expect("hits");
        let after = fs::read(&fin).expect("r");
        assert_eq!(after.len(), before.len());
        assert_eq!(&after[..12], &before[..12]);
        assert_eq!(&after[12..16], &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(&after[16..], &before[16..]);
        assert_eq!(
            parse_full(&after, &key).expect("valid").hit_count,
            0xDEAD_BEEF
        );
    }
}
