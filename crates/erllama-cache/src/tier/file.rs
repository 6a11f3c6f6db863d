//! What the two file tiers share: staging through a synced temp file,
//! linking with adopt-or-replace, the startup scan, hit-count updates and
//! the two ways of reading a file back.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{
    Committed, LoadError, Payload, Recovered, SaveStage, Staged, TierError, TierKind, Visible,
};
use crate::fsio::{
    final_path, link_into_place, not_regular, open_regular, prepare_dir, read_file, scan_dir,
    write_hit_count, write_temp_probed, FsioError,
};
use crate::key::CacheKey;
use crate::kvc::{parse_full, parse_meta_with_len, KvcError, PAYLOAD_OFFSET_OFFSET};

/// `impl Tier` for a newtype over [`FileStore`]: both file tiers are the
/// same byte work on different directories (their difference is where the
/// directory lives and the read mode chosen for it).
macro_rules! file_tier {
    ($name:ident, $kind:expr) => {
        impl $crate::tier::Tier for $name {
            fn kind(&self) -> $crate::tier::TierKind {
                $kind
            }
            fn dir(&self) -> Option<&std::path::Path> {
                Some(self.0.dir())
            }
            fn recover(
                &self,
            ) -> Result<(Vec<$crate::tier::Recovered>, usize), $crate::tier::TierError> {
                self.0.recover()
            }
            fn stage(
                &self,
                key: &$crate::key::CacheKey,
                header: Vec<u8>,
                payload: Vec<u8>,
                probe: &dyn Fn($crate::tier::SaveStage),
            ) -> Result<$crate::tier::Staged, $crate::tier::TierError> {
                let staged = self.0.stage(key, &header, &payload, probe);
                // The pack buffer serves the next pack.
                $crate::tier::pool::give_back(payload);
                staged
            }
            fn stage_kvc(
                &self,
                key: &$crate::key::CacheKey,
                bytes: Vec<u8>,
                start: usize,
            ) -> Result<$crate::tier::Staged, $crate::tier::TierError> {
                let (header, payload) = bytes.split_at(start.min(bytes.len()));
                let staged = self.0.stage(key, header, payload, &|_| {});
                $crate::tier::pool::give_back(bytes);
                staged
            }
            fn commit(
                &self,
                key: &$crate::key::CacheKey,
                staged: $crate::tier::Staged,
            ) -> Result<$crate::tier::Committed, $crate::tier::TierError> {
                self.0.commit(key, staged)
            }
            fn discard(&self, staged: $crate::tier::Staged) {
                self.0.discard(staged);
            }
            fn load(
                &self,
                key: &$crate::key::CacheKey,
                expected_size: u64,
            ) -> Result<$crate::tier::Payload, $crate::tier::LoadError> {
                self.0.load(key, expected_size)
            }
            fn remove(&self, key: &$crate::key::CacheKey) -> Result<(), $crate::tier::TierError> {
                self.0.remove(key)
            }
            fn record_hits(&self, key: &$crate::key::CacheKey, hits: u32) {
                self.0.record_hits(key, hits);
            }
            fn validate_visible(&self, key: &$crate::key::CacheKey) -> $crate::tier::Visible {
                self.0.validate_visible(key)
            }
            fn visible(&self, key: &$crate::key::CacheKey) -> bool {
                std::fs::symlink_metadata(self.0.path(key)).is_ok()
            }
            fn lock_dir(&self) -> std::io::Result<Option<$crate::fsio::DirLock>> {
                $crate::fsio::DirLock::acquire(self.0.dir()).map(Some)
            }
            fn dir_rows(&self) -> Vec<$crate::fsio::DirFile> {
                $crate::fsio::list_rows(self.0.dir()).unwrap_or_default()
            }
        }
    };
}
pub(crate) use file_tier;

/// How a file tier reads a row back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FileLoad {
    /// `read(2)` into a buffer of the size checked with `fstat`, the CRC
    /// computed as the bytes arrive; every check runs on the copy, so a
    /// file changed underneath yields an error, never a signal or a wrong
    /// state.
    #[default]
    Read,
    /// Map the file (size checked first), run the full
    /// parse on the mapping and restore straight from it: no copy. Safe
    /// against everything erllama does to its files (they are immutable
    /// once published, replaced by rename and removed by unlink); see
    /// `map_file` for the one case it trusts.
    Mmap,
}

/// A directory of `<hex>.kvc` files: the body of [`super::RamFileTier`]
/// and [`super::DiskTier`].
#[derive(Debug)]
pub(crate) struct FileStore {
    pub(crate) kind: TierKind,
    pub(crate) dir: PathBuf,
    pub(crate) writer: String,
    pub(crate) load_mode: FileLoad,
}

impl FileStore {
    pub(crate) fn new(kind: TierKind, dir: PathBuf, writer: String, load_mode: FileLoad) -> Self {
        Self {
            kind,
            dir,
            writer,
            load_mode,
        }
    }

    pub(crate) fn path(&self, key: &CacheKey) -> PathBuf {
        final_path(&self.dir, key)
    }

    pub(crate) fn recover(&self) -> Result<(Vec<Recovered>, usize), TierError> {
        // Prove the directory can hold the tier before touching anything in
        // it: a directory that cannot take a save would otherwise fail
        // every save later, logged but otherwise silent.
        prepare_dir(&self.dir, &self.writer).map_err(|source| TierError::Dir {
            dir: self.dir.clone(),
            source,
        })?;
        let report = scan_dir(&self.dir)?;
        let rows = report
            .registered
            .into_iter()
            .map(|(key, _path, meta, size)| Recovered { key, meta, size })
            .collect();
        Ok((rows, report.removed_invalid.len()))
    }

    pub(crate) fn stage(
        &self,
        key: &CacheKey,
        header: &[u8],
        payload: &[u8],
        probe: &dyn Fn(SaveStage),
    ) -> Result<Staged, TierError> {
        let temp = write_temp_probed(&self.dir, key, &self.writer, header, payload, &|| {
            probe(SaveStage::TempPartial);
        })
        .map_err(|e| TierError::io("write_temp", e))?;
        Ok(Staged::File(temp))
    }

    pub(crate) fn commit(&self, key: &CacheKey, staged: Staged) -> Result<Committed, TierError> {
        let Staged::File(temp) = staged else {
            unreachable!("a file tier only stages files");
        };
        let dest = self.path(key);
        let outcome = link_into_place(&temp, &dest, key)?;
        // lstat: the size of the entry itself, which link_into_place left a
        // regular file (linked, renamed, or adopted after a no-follow read).
        let size = std::fs::symlink_metadata(&dest)
            .map_err(|e| FsioError::Io {
                op: "metadata",
                path: dest.clone(),
                source: e,
            })?
            .len();
        Ok(Committed { outcome, size })
    }

    pub(crate) fn discard(&self, staged: Staged) {
        if let Staged::File(temp) = staged {
            let _ = std::fs::remove_file(temp);
        }
    }

    pub(crate) fn load(&self, key: &CacheKey, expected_size: u64) -> Result<Payload, LoadError> {
        let path = self.path(key);
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                LoadError::Missing {
                    key: *key,
                    tier: self.kind,
                    reason: "file not found".into(),
                }
            } else if let Some(nr) = not_regular(&source) {
                // Replaced underneath by a link or a FIFO: the row's bytes
                // are gone; the index drops the row and unlinks the entry.
                tracing::warn!(
                    path = %path.display(),
                    kind = nr.kind,
                    "not a regular file at a tier file's name: not read"
                );
                LoadError::Missing {
                    key: *key,
                    tier: self.kind,
                    reason: nr.to_string(),
                }
            } else {
                LoadError::Io {
                    key: *key,
                    tier: self.kind,
                    source,
                }
            }
        };
        let file = open_regular(&path, false).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len != expected_size {
            // Truncated or grown underneath: never read a file whose size
            // is not the one validated at registration.
            let error = if len < expected_size {
                KvcError::Truncated {
                    expected_len: expected_size,
                    file_len: len,
                }
            } else {
                KvcError::TrailingBytes {
                    expected_len: expected_size,
                    file_len: len,
                }
            };
            return Err(LoadError::Corrupt {
                key: *key,
                tier: self.kind,
                error,
            });
        }
        let len = usize::try_from(len).map_err(|_| LoadError::Missing {
            key: *key,
            tier: self.kind,
            reason: "file larger than the address space".into(),
        })?;
        let shrank = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                LoadError::Missing {
                    key: *key,
                    tier: self.kind,
                    reason: "file shrank while being read".into(),
                }
            } else {
                io_err(e)
            }
        };
        let corrupt = |error| LoadError::Corrupt {
            key: *key,
            tier: self.kind,
            error,
        };
        let (buf, crc) = match self.load_mode {
            FileLoad::Read => read_with_crc(file, len).map_err(shrank)?,
            FileLoad::Mmap => {
                let map = map_file(&file, len).map_err(shrank)?;
                let meta = parse_full(&map, key).map_err(corrupt)?;
                let start = usize::try_from(meta.payload_offset)
                    .expect("the parse checked the offset against the mapping");
                let logits = usize::try_from(meta.logits_bytes())
                    .expect("the parse checked it against the payload");
                return Ok(Payload::mapped(map, start, logits));
            }
        };
        let meta = match crc {
            // The CRC was computed while reading, chunk by chunk, while each
            // chunk was still in cache: only the framing and key remain.
            Some((offset, crc)) => {
                let meta = parse_meta_with_len(&buf, len as u64).map_err(corrupt)?;
                if meta.payload_offset == offset {
                    meta.verify_crc_and_key(crc, key).map_err(corrupt)?;
                    meta
                } else {
                    parse_full(&buf, key).map_err(corrupt)?
                }
            }
            None => parse_full(&buf, key).map_err(corrupt)?,
        };
        let start = usize::try_from(meta.payload_offset)
            .expect("the parse checked the offset against the buffer");
        let logits =
            usize::try_from(meta.logits_bytes()).expect("the parse checked it against the payload");
        Ok(Payload::owned(buf, start, logits))
    }

    pub(crate) fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FsioError::Io {
                op: "remove",
                path,
                source: e,
            }
            .into()),
            _ => Ok(()),
        }
    }

    pub(crate) fn record_hits(&self, key: &CacheKey, hits: u32) {
        // Advisory: a failure (file evicted meanwhile) changes nothing.
        let _ = write_hit_count(&self.path(key), hits);
    }

    pub(crate) fn validate_visible(&self, key: &CacheKey) -> Visible {
        let path = self.path(key);
        let bytes = match read_file(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if let Some(nr) = not_regular(&e) {
                    // Never adopted; unlink removes the entry, not a
                    // link's target.
                    tracing::warn!(
                        path = %path.display(),
                        kind = nr.kind,
                        "not a regular file in a tier directory: removed, not adopted"
                    );
                    let _ = std::fs::remove_file(&path);
                    return Visible::RemovedInvalid;
                }
                return Visible::Absent;
            }
        };
        match parse_full(&bytes, key) {
            Ok(meta) => Visible::Valid(Box::new(Recovered {
                key: *key,
                meta,
                size: bytes.len() as u64,
            })),
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                Visible::RemovedInvalid
            }
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `(payload offset, CRC32C of the bytes from there)`.
type PayloadCrc = (u64, u32);

/// Read size: small enough that a chunk is still in cache when its CRC is
/// computed, large enough to keep syscall overhead out of the profile.
const READ_CHUNK: usize = 256 << 10;

/// Reads exactly `len` bytes into a fresh buffer (never zero-filled first)
/// and computes the CRC32C of everything after the payload offset named
/// in the header's trailer, chunk by chunk as it arrives. Returns the bytes
/// and `(payload offset, crc)` when the header names a usable offset.
///
/// A file that shrank yields `UnexpectedEof`; one that grew, `InvalidData`.
fn read_with_crc(file: File, len: usize) -> io::Result<(Vec<u8>, Option<PayloadCrc>)> {
    let mut buf = super::pool::take(len);
    let mut reader = file.take(len as u64 + 1);
    let mut offset: Option<u64> = None;
    let mut crc = 0u32;
    loop {
        let before = buf.len();
        let n = (&mut reader)
            .take(READ_CHUNK as u64)
            .read_to_end(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf.len() > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "file grew while being read",
            ));
        }
        let mut from = before;
        if offset.is_none() && buf.len() >= PAYLOAD_OFFSET_OFFSET + 8 {
            let field: [u8; 8] = buf[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 8]
                .try_into()
                .expect("8 bytes");
            // An offset past the end is clamped; the parse reports it.
            let off = u64::from_le_bytes(field).min(len as u64);
            offset = Some(off);
            from = 0;
        }
        if let Some(off) = offset {
            let start = from.max(usize::try_from(off).unwrap_or(len)).min(buf.len());
            crc = crc32c::crc32c_append(crc, &buf[start..]);
        }
    }
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file shrank while being read",
        ));
    }
    Ok((buf, offset.map(|o| (o, crc))))
}

/// Maps the whole file, read-only. Pages are faulted in as the parse and the
/// restore read them (`MAP_POPULATE` measured no faster).
fn map_file(file: &File, len: usize) -> io::Result<Mmap> {
    // SAFETY: mapping a file is unsafe because the mapping's bytes change
    // (or, past a truncation, fault with SIGBUS) if the file is modified
    // while mapped. What holds here:
    // - the length was checked with fstat on this same descriptor just
    //   before, so the mapping covers exactly the bytes that exist;
    // - this crate never modifies a published file's bytes except the
    //   4-byte hit count (outside the CRC and the payload) and never
    //   truncates one: replacements are new inodes renamed into place and
    //   evictions unlink, so either leaves this mapping on the old, intact
    //   inode for as long as the payload lives;
    // - the tier directory is private to the user (0o700);
    // - every check (length, framing, CRC32C over the payload, recomputed
    //   key) runs on the mapping before the payload is handed out.
    // What is left is another process of the same user writing into or
    // truncating a published file in place, which no erllama process
    // does; that could change the bytes after the check, or raise SIGBUS.
    // `FileLoad::Read` (the `disk` default) copies and cannot be hit.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
    if map.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file changed size before mapping",
        ));
    }
    Ok(map)
}
