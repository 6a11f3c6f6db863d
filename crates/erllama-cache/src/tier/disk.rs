//! The `disk` tier: KVC files on persistent storage.
//!
//! Survives restarts; the big, cheap tier, first-class rather than a
//! fallback. Writes follow the crash-safe publish protocol (temp file,
//! fsync, link, directory fsync); reads use `read(2)` by default (see
//! [`FileLoad`]) and run the full parse.

use std::path::{Path, PathBuf};

use super::file::FileStore;
use super::{
    Committed, FileLoad, LoadError, Payload, Recovered, SaveStage, Staged, Tier, TierError,
    TierKind, Visible,
};
use crate::key::CacheKey;

/// Files on persistent storage.
#[derive(Debug)]
pub struct DiskTier(FileStore);

impl DiskTier {
    /// A tier over `dir` (created 0o700 by [`Tier::recover`] when
    /// missing); `writer` names this writer in temp file names.
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

impl Tier for DiskTier {
    fn kind(&self) -> TierKind {
        TierKind::Disk
    }
    fn dir(&self) -> Option<&Path> {
        Some(self.0.dir())
    }
    fn recover(&self) -> Result<(Vec<Recovered>, usize), TierError> {
        self.0.recover()
    }
    fn stage(
        &self,
        key: &CacheKey,
        header: Vec<u8>,
        payload: Vec<u8>,
        probe: &dyn Fn(SaveStage),
    ) -> Result<Staged, TierError> {
        self.0.stage(key, &header, &payload, probe)
    }
    fn commit(&self, key: &CacheKey, staged: Staged) -> Result<Committed, TierError> {
        self.0.commit(key, staged)
    }
    fn discard(&self, staged: Staged) {
        self.0.discard(staged);
    }
    fn load(&self, key: &CacheKey, expected_size: u64) -> Result<Payload, LoadError> {
        self.0.load(key, expected_size)
    }
    fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.0.remove(key)
    }
    fn record_hits(&self, key: &CacheKey, hits: u32) {
        self.0.record_hits(key, hits);
    }
    fn validate_visible(&self, key: &CacheKey) -> Visible {
        self.0.validate_visible(key)
    }
}
