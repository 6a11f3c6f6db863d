//! The `ram_file` tier: KVC files in a tmpfs directory (`/dev/shm/…`).
//!
//! Survives a model (or process) restart and can be shared by several
//! processes on one host. Writes follow the crash-safe publish protocol;
//! reads go through `mmap` or `read(2)` (see [`FileLoad`]; both copy the
//! file once and run the full parse on the copy).

use std::path::PathBuf;

use super::file::FileStore;
use super::{FileLoad, TierKind};

/// Files on tmpfs.
#[derive(Debug)]
pub struct RamFileTier(FileStore);

impl RamFileTier {
    /// A tier over `dir` (created when missing, made 0o700 and probed by
    /// [`Tier::recover`](super::Tier::recover)); `writer` names this writer
    /// in temp file names.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, writer: &str, load: FileLoad) -> Self {
        Self(FileStore::new(
            TierKind::RamFile,
            dir.into(),
            writer.to_owned(),
            load,
        ))
    }
}

super::file::file_tier!(RamFileTier, TierKind::RamFile);
