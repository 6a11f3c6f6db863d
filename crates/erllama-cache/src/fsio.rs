//! File primitives for the `ram_file` and `disk` tiers (docs/tiers.md
//! steps 2 and 4): private directories, exclusive temp writes, the
//! create-if-absent link with adopt-or-replace, the startup scan, plain
//! reads and the advisory hit-count update. No index lives here; the meta
//! index calls these.
//!
//! Decisions the spec leaves open:
//!
//! - The startup scan deletes `*.tmp` and every `*.kvc` file that fails the
//!   meta parse or whose name is not `<recomputed key hex>.kvc`. Files with
//!   any other name (e.g. `notes.txt`) are left alone: the directory may be
//!   shared with things the cache does not own.
//! - Symbolic links are never followed and never deleted by the scan: a
//!   symlink is skipped whatever its name (so is any subdirectory), because
//!   following one could register or delete a file outside the tier.
//! - Hit counts are advisory: [`write_hit_count`] does not sync, and the
//!   CRC covers only the payload, so a lost update never invalidates a file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
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
}

impl FsioError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        FsioError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The underlying I/O error.
    #[must_use]
    pub fn io_error(&self) -> &io::Error {
        match self {
            FsioError::Io { source, .. } => source,
        }
    }
}

/// The final path of `key`'s file in a tier directory:
/// `<dir>/<64 lowercase hex>.kvc`.
#[must_use]
pub fn final_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{key}{KVC_EXT}"))
}

/// Creates `dir` (and missing parents) with mode 0o700 when it is missing.
/// An existing directory's mode is left as it is.
///
/// # Errors
///
/// Any error of the directory creation.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
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
    if writer.is_empty() || writer.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad writer name {writer:?}"),
        ));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let unique = format!(
        "{}-{}-{nanos}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let temp = dir.join(format!("{key}{KVC_EXT}.{writer}.{unique}{TMP_EXT}"));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    // Removes the partial temp file on an error and on unwinding out of
    // `between`.
    struct RemoveOnDrop(Option<PathBuf>);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            if let Some(path) = self.0.take() {
                let _ = fs::remove_file(path);
            }
        }
    }
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
/// `final_path` exists it is never ignored: it is read and fully parsed
/// against `expected`; a valid file is adopted (temp removed), an invalid
/// or unreadable one is replaced once by renaming `temp` over it (atomic)
/// and syncing the directory.
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
            let valid = fs::read(final_path)
                .ok()
                .is_some_and(|bytes| parse_full(&bytes, expected).is_ok());
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
    /// `*.kvc` files deleted as invalid, with why.
    pub removed_invalid: Vec<(PathBuf, String)>,
}

/// Reads just the header of a KVC file and meta-parses it with the file's
/// length (no CRC, no key check: see [`parse_full`] for those). Used by
/// the startup scan and by inspection tools.
///
/// # Errors
///
/// A message naming the I/O or framing error.
pub fn read_header(path: &Path) -> Result<(KvcMeta, u64), String> {
    let mut file = File::open(path).map_err(|e| format!("open: {e}"))?;
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

/// docs/tiers.md start of a file tier: creates `dir` if missing, deletes
/// `*.tmp`, registers every `*.kvc` file that passes the meta parse and is
/// named after the key recomputed from its contents, and deletes every
/// other `*.kvc` file (listing it with its error). Non-`.kvc` files,
/// symlinks and subdirectories are left alone (see the module docs).
///
/// # Errors
///
/// [`FsioError::Io`] when the directory cannot be created or listed, or a
/// file to delete cannot be removed.
pub fn scan_dir(dir: &Path) -> Result<ScanReport, FsioError> {
    ensure_dir(dir).map_err(|e| FsioError::io("create_dir", dir, e))?;
    let mut report = ScanReport::default();
    let entries = fs::read_dir(dir).map_err(|e| FsioError::io("read_dir", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FsioError::io("read_dir", dir, e))?;
        let path = entry.path();
        // DirEntry::file_type does not follow symlinks.
        let file_type = entry
            .file_type()
            .map_err(|e| FsioError::io("file_type", &path, e))?;
        if !file_type.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue; // Not UTF-8: not a name this crate writes.
        };
        if name.ends_with(TMP_EXT) {
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

/// Reads a whole file.
///
/// # Errors
///
/// Any error of the read.
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    fs::read(path)
}

/// Overwrites the hit count (4 bytes little-endian at offset 12) of an
/// existing KVC file in place. Not synced: hit counts are advisory and
/// outside the CRC, so a lost update is harmless.
///
/// # Errors
///
/// Any error of opening or writing the file.
pub fn write_hit_count(path: &Path, hits: u32) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
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
        fs::write(dir.join(format!("{good_key}.kvc.w.1-2-3.tmp")), b"partial").expect("w");
        fs::write(dir.join("x.tmp"), b"").expect("w");
        fs::write(dir.join("notes.txt"), b"keep me").expect("w");
        std::os::unix::fs::symlink(
            final_path(&dir, &good_key),
            dir.join(format!("{}.kvc", key_of(&[9]))),
        )
        .expect("symlink");

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
            5,
            "{:?}",
            report.removed_invalid
        );
        for (p, why) in &report.removed_invalid {
            assert!(!p.exists(), "{} still there", p.display());
            assert!(!why.is_empty());
        }
        assert_eq!(fs::read(dir.join("notes.txt")).expect("notes"), b"keep me");
        // The symlink is skipped, not followed or deleted.
        assert!(fs::symlink_metadata(dir.join(format!("{}.kvc", key_of(&[9])))).is_ok());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
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
