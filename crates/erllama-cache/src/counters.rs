//! Always-on cache counters (docs/counters.md).
//!
//! [`Counters`] holds one [`AtomicU64`] per [`Counter`]; every update is a
//! single atomic operation, so counting costs next to nothing on the hot
//! path and needs no lock. The whole set is readable as a map
//! ([`Counters::snapshot`]) and resettable ([`Counters::reset`]).
//!
//! Two kinds of value live here:
//!
//! - **event counters** (hits, misses, saves, evictions, timings, …) only
//!   ever grow until [`Counters::reset`] zeroes them;
//! - **live-byte gauges** ([`Counter::BytesRam`], [`Counter::BytesRamFile`],
//!   [`Counter::BytesDisk`]) describe what each tier stores *now*: they go
//!   up on store and down on removal ([`Counters::sub`], saturating at 0),
//!   and [`Counters::reset`] leaves them alone so they stay true.
//!
//! # Memory ordering
//!
//! All operations use [`Ordering::Relaxed`]. Each counter is an independent
//! statistic: no other memory is published through it and no reader infers
//! anything about other data from a value it sees, so only per-variable
//! atomicity (no lost updates) is needed, which Relaxed read-modify-write
//! operations guarantee. A [`Counters::snapshot`] is therefore a set of
//! individually exact values, not one instant across all counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Declares [`Counter`] with its variants, their names and `ALL` in one
/// place so the three can never disagree.
macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)+) => {
        /// One named counter in [`Counters`] (docs/counters.md).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $($(#[$doc])* $variant,)+
        }

        impl Counter {
            /// Every counter, in the documented order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// The counter's exact snake_case name, as used in
            /// [`Counters::snapshot`].
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)+
                }
            }
        }
    };
}

counters! {
    /// Exact-key hits.
    HitsExact => "hits_exact",
    /// Session-resume hits.
    HitsResume => "hits_resume",
    /// Longest-prefix hits.
    HitsLongestPrefix => "hits_longest_prefix",
    /// Prompts that started from a prefix another sequence of the same
    /// context held (shared cells, nothing restored).
    HitsShared => "hits_shared",
    /// Lookups that found nothing.
    Misses => "misses",
    /// Cold saves.
    SavesCold => "saves_cold",
    /// Continued saves.
    SavesContinued => "saves_continued",
    /// Finish saves.
    SavesFinish => "saves_finish",
    /// Saves made on eviction.
    SavesEvict => "saves_evict",
    /// Saves made on shutdown.
    SavesShutdown => "saves_shutdown",
    /// Saves refused for back pressure.
    SavesDropped => "saves_dropped",
    /// Saves that failed after their reservation (write, link or publish).
    SavesFailed => "saves_failed",
    /// Saves dropped because the key was already present.
    DuplicateDropped => "duplicate_dropped",
    /// Rows evicted.
    Evictions => "evictions",
    /// Files found corrupt (framing, CRC or key mismatch).
    CorruptFiles => "corrupt_files",
    /// Rows found and read whose state the model refused (or that could not
    /// be read); each such row is removed and the request falls back.
    RestoreFailures => "restore_failures",
    /// Total nanoseconds spent packing state for saves.
    PackTotalNs => "pack_total_ns",
    /// Total nanoseconds spent loading state.
    LoadTotalNs => "load_total_ns",
    /// Longest-prefix probes made.
    LongestPrefixProbes => "longest_prefix_probes",
    /// Total nanoseconds spent in longest-prefix walks.
    LongestPrefixNs => "longest_prefix_ns",
    /// Rows another process published into a shared file tier after this
    /// index was built, found on a lookup miss and adopted after the full
    /// validation.
    FilesAdopted => "files_adopted",
    /// Rows found in the remote tier (Redis) after every local tier missed.
    RemoteHits => "remote_hits",
    /// Remote lookups that found nothing.
    RemoteMisses => "remote_misses",
    /// Remote operations that failed or timed out (the request went on).
    RemoteErrors => "remote_errors",
    /// Remote operations skipped while the circuit breaker was open.
    RemoteSkipped => "remote_skipped",
    /// Remote values that failed validation (deleted from the store).
    RemoteCorrupt => "remote_corrupt",
    /// Rows written to the remote tier.
    RemoteWrites => "remote_writes",
    /// Bytes read from the remote tier.
    RemoteBytesRead => "remote_bytes_read",
    /// Bytes written to the remote tier.
    RemoteBytesWritten => "remote_bytes_written",
    /// Total nanoseconds spent in remote lookups (probe, fetch, check).
    RemoteLookupNs => "remote_lookup_ns",
    /// Live bytes stored in the RAM tier (gauge; kept by `reset`).
    BytesRam => "bytes_ram",
    /// Live bytes stored in the RAM-file tier (gauge; kept by `reset`).
    BytesRamFile => "bytes_ram_file",
    /// Live bytes stored in the disk tier (gauge; kept by `reset`).
    BytesDisk => "bytes_disk",
}

impl Counter {
    /// Whether this is a live-byte gauge ([`Counter::BytesRam`],
    /// [`Counter::BytesRamFile`], [`Counter::BytesDisk`]), which
    /// [`Counters::reset`] does not touch.
    #[must_use]
    pub const fn is_gauge(self) -> bool {
        matches!(
            self,
            Counter::BytesRam | Counter::BytesRamFile | Counter::BytesDisk
        )
    }

    const fn index(self) -> usize {
        self as usize
    }
}

const COUNT: usize = Counter::ALL.len();

/// The cache's counters: one lock-free [`AtomicU64`] per [`Counter`].
///
/// Share it by reference or `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Counters {
    values: [AtomicU64; COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    /// All counters at zero.
    #[must_use]
    pub fn new() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn cell(&self, counter: Counter) -> &AtomicU64 {
        &self.values[counter.index()]
    }

    /// Adds `n` to `counter` (wrapping at `u64::MAX`, which real workloads
    /// never reach).
    pub fn add(&self, counter: Counter, n: u64) {
        self.cell(counter).fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to `counter`.
    pub fn incr(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Subtracts `n` from `counter`, saturating at 0 (for the live-byte
    /// gauges; a double removal can never wrap a gauge to a huge value).
    pub fn sub(&self, counter: Counter, n: u64) {
        // The closure always returns Some, so fetch_update cannot fail.
        let _ = self
            .cell(counter)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// The current value of `counter`.
    #[must_use]
    pub fn get(&self, counter: Counter) -> u64 {
        self.cell(counter).load(Ordering::Relaxed)
    }

    /// Every counter by name; all names of [`Counter::ALL`] are always
    /// present, zero or not.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .map(|&c| (c.name(), self.get(c)))
            .collect()
    }

    /// Zeroes every event counter. The live-byte gauges
    /// ([`Counter::BytesRam`], [`Counter::BytesRamFile`],
    /// [`Counter::BytesDisk`]) are kept: they describe what is stored now,
    /// and zeroing them would make them false until the tiers emptied.
    pub fn reset(&self) {
        for &c in Counter::ALL {
            if !c.is_gauge() {
                self.cell(c).store(0, Ordering::Relaxed);
            }
        }
    }

    /// Starts timing; the returned guard adds the elapsed nanoseconds to
    /// `counter` when dropped.
    #[must_use = "the guard measures until it is dropped"]
    pub fn time(&self, counter: Counter) -> TimerGuard<'_> {
        TimerGuard {
            counters: self,
            counter,
            start: Instant::now(),
        }
    }
}

/// Adds the nanoseconds since its creation to a counter when dropped; made
/// by [`Counters::time`].
#[derive(Debug)]
pub struct TimerGuard<'a> {
    counters: &'a Counters,
    counter: Counter,
    start: Instant,
}

impl Drop for TimerGuard<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.counters.add(self.counter, ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SPEC_NAMES: [&str; 33] = [
        "hits_exact",
        "hits_resume",
        "hits_longest_prefix",
        "hits_shared",
        "misses",
        "saves_cold",
        "saves_continued",
        "saves_finish",
        "saves_evict",
        "saves_shutdown",
        "saves_dropped",
        "saves_failed",
        "duplicate_dropped",
        "evictions",
        "corrupt_files",
        "restore_failures",
        "pack_total_ns",
        "load_total_ns",
        "longest_prefix_probes",
        "longest_prefix_ns",
        "files_adopted",
        "remote_hits",
        "remote_misses",
        "remote_errors",
        "remote_skipped",
        "remote_corrupt",
        "remote_writes",
        "remote_bytes_read",
        "remote_bytes_written",
        "remote_lookup_ns",
        "bytes_ram",
        "bytes_ram_file",
        "bytes_disk",
    ];

    #[test]
    fn names_match_spec_in_order() {
        let names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, SPEC_NAMES);
    }

    #[test]
    fn snapshot_has_every_spec_name() {
        let c = Counters::new();
        let snap = c.snapshot();
        let mut expected: Vec<&str> = SPEC_NAMES.to_vec();
        expected.sort_unstable();
        let keys: Vec<&str> = snap.keys().copied().collect();
        assert_eq!(keys, expected);
        assert!(snap.values().all(|&v| v == 0));
    }

    #[test]
    fn add_incr_sub() {
        let c = Counters::new();
        c.incr(Counter::HitsExact);
        c.incr(Counter::HitsExact);
        c.add(Counter::HitsExact, 5);
        assert_eq!(c.get(Counter::HitsExact), 7);
        c.add(Counter::BytesDisk, 100);
        c.sub(Counter::BytesDisk, 30);
        assert_eq!(c.get(Counter::BytesDisk), 70);
        c.sub(Counter::BytesDisk, 1_000);
        assert_eq!(c.get(Counter::BytesDisk), 0);
        c.sub(Counter::BytesDisk, 1);
        assert_eq!(c.get(Counter::BytesDisk), 0);
        assert_eq!(c.snapshot()["hits_exact"], 7);
        assert_eq!(c.get(Counter::Misses), 0);
    }

    #[test]
    fn reset_keeps_live_byte_gauges() {
        let c = Counters::new();
        for (i, &k) in Counter::ALL.iter().enumerate() {
            c.add(k, i as u64 + 1);
        }
        c.reset();
        for (i, &k) in Counter::ALL.iter().enumerate() {
            let want = if k.is_gauge() { i as u64 + 1 } else { 0 };
            assert_eq!(c.get(k), want, "{}", k.name());
        }
        let gauges: Vec<&str> = Counter::ALL
            .iter()
            .filter(|c| c.is_gauge())
            .map(|c| c.name())
            .collect();
        assert_eq!(gauges, ["bytes_ram", "bytes_ram_file", "bytes_disk"]);
    }

    #[test]
    fn concurrent_increments_sum() {
        let c = Arc::new(Counters::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.incr(Counter::Misses);
                        c.add(Counter::BytesRam, 2);
                        c.sub(Counter::BytesRam, 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker thread");
        }
        assert_eq!(c.get(Counter::Misses), 40_000);
        assert_eq!(c.get(Counter::BytesRam), 40_000);
    }

    #[test]
    fn timer_guard_adds_elapsed() {
        let c = Counters::new();
        {
            let _t = c.time(Counter::PackTotalNs);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let first = c.get(Counter::PackTotalNs);
        assert!(first >= 1_000_000, "{first}");
        {
            let _t = c.time(Counter::PackTotalNs);
        }
        assert!(c.get(Counter::PackTotalNs) >= first);
        assert_eq!(c.get(Counter::LoadTotalNs), 0);
    }
}
