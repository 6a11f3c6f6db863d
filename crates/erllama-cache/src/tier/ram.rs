//! The `ram` tier: an in-process store of rows held by `Arc`.
//!
//! Staging builds the row: the payload is copied (on the writer thread,
//! off the request path) into a buffer of its exact size, and the packed
//! buffer goes back to the pool for the next pack, so a save on the
//! request path never allocates; committing inserts the row; a load clones
//! the `Arc`, so restoring from RAM never copies the payload. A row being read stays alive after eviction
//! until the reader drops it, so an eviction never pulls bytes from under
//! a restore.

use std::sync::Arc;

use super::{
    Committed, LoadError, Payload, RamRow, Recovered, SaveStage, Staged, Tier, TierError, TierKind,
    Visible,
};
use crate::fsio::LinkOutcome;
use crate::key::CacheKey;
use crate::kvc::parse_meta_with_len;

/// The in-process RAM tier. Lookups in the store are lock-free.
#[derive(Debug, Default)]
pub struct RamTier {
    store: papaya::HashMap<CacheKey, Arc<RamRow>>,
}

impl RamTier {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of rows held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.store.pin().len()
    }

    /// Whether the store is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn row_size(row: &RamRow) -> u64 {
    row.bytes.len() as u64
}

impl Tier for RamTier {
    fn kind(&self) -> TierKind {
        TierKind::Ram
    }

    fn recover(&self) -> Result<(Vec<Recovered>, usize), TierError> {
        Ok((Vec::new(), 0))
    }

    fn stage(
        &self,
        _key: &CacheKey,
        header: Vec<u8>,
        payload: Vec<u8>,
        _probe: &dyn Fn(SaveStage),
    ) -> Result<Staged, TierError> {
        // The header was built from this payload a moment ago.
        let logits = parse_meta_with_len(&header, (header.len() + payload.len()) as u64)
            .map_or(0, |m| usize::try_from(m.logits_bytes()).unwrap_or(0));
        let mut bytes = super::pool::fresh(header.len() + payload.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&payload);
        let row = RamRow {
            bytes,
            start: header.len(),
            logits,
        };
        super::pool::give_back(payload);
        Ok(Staged::Ram(Arc::new(row)))
    }

    fn stage_kvc(
        &self,
        _key: &CacheKey,
        bytes: Vec<u8>,
        start: usize,
    ) -> Result<Staged, TierError> {
        let logits = parse_meta_with_len(&bytes[..start.min(bytes.len())], bytes.len() as u64)
            .map_or(0, |m| usize::try_from(m.logits_bytes()).unwrap_or(0));
        Ok(Staged::Ram(Arc::new(RamRow {
            bytes,
            start,
            logits,
        })))
    }

    fn commit(&self, key: &CacheKey, staged: Staged) -> Result<Committed, TierError> {
        let Staged::Ram(row) = staged else {
            unreachable!("the RAM tier only stages RAM rows");
        };
        let store = self.store.pin();
        // The index allows one save per key at a time, so an existing row
        // can only be an identical one: keep it (the existing bytes win).
        let (kept, outcome) = match store.try_insert(*key, row) {
            Ok(row) => (row_size(row), LinkOutcome::Linked),
            Err(e) => (row_size(e.current), LinkOutcome::AdoptedExisting),
        };
        Ok(Committed {
            outcome,
            size: kept,
        })
    }

    fn discard(&self, _staged: Staged) {}

    fn load(&self, key: &CacheKey, _expected_size: u64) -> Result<Payload, LoadError> {
        match self.store.pin().get(key) {
            Some(row) => Ok(Payload::shared(Arc::clone(row))),
            None => Err(LoadError::Missing {
                key: *key,
                tier: TierKind::Ram,
                reason: "not in the RAM store".into(),
            }),
        }
    }

    fn remove(&self, key: &CacheKey) -> Result<(), TierError> {
        self.store.pin().remove(key);
        Ok(())
    }

    fn record_hits(&self, _key: &CacheKey, _hits: u32) {}

    fn validate_visible(&self, key: &CacheKey) -> Visible {
        let store = self.store.pin();
        let Some(row) = store.get(key) else {
            return Visible::Absent;
        };
        let size = row_size(row);
        match parse_meta_with_len(&row.bytes[..row.start], size) {
            Ok(meta) => Visible::Valid(Box::new(Recovered {
                key: *key,
                meta,
                size,
            })),
            Err(_) => {
                store.remove(key);
                Visible::RemovedInvalid
            }
        }
    }
}
