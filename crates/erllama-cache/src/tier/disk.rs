//! The `disk` tier: KVC files on persistent storage.
//!
//! Survives restarts; the big, cheap tier, first-class rather than a
//! fallback. Writes follow the crash-safe publish protocol (temp file,
//! fsync, link, directory fsync); reads use `read(2)` by default (see
//! [`FileLoad`]) and run the full parse.

use std::path::PathBuf;

use super::file::FileStore;
use super::{FileLoad, TierKind};

/// Files on persistent storage.
#[derive(Debug)]
pub struct DiskTier(FileStore);

impl DiskTier {
    /// A tier over `dir` (created when missing, made 0o700 and probed by
    /// [`Tier::recover`](super::Tier::recover)); `writer` names this writer
    /// in temp file names.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, writer: &str, load: FileLoad) -> Self {
        Self(FileStore::new(
            TierKind::Disk,
            dir.into(),
            writer.to_owned(),
            load,
        ))
    }
}

super::file::file_tier!(DiskTier, TierKind::Disk);
