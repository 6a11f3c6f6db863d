//! Accounting of the KV cells of a context's sequences.
//!
//! In a pooled context ([`crate::KvCells::Pooled`]) the sequences share one
//! unified cache.
//! A sequence's cells hold its tokens at positions `0..len`. When sequence
//! `dst` copies the first `k` tokens of `src` (llama.cpp's `seq_cp` over a
//! unified cache), the two *share* those `k` cells: no new cell is used.
//! [`CellLedger::used`] counts every distinct cell once: each sequence owns
//! the cells past what it shares with its source. When a source drops cells
//! that a dependent still holds, the dependent becomes their owner (and any
//! other dependent of the same cells shares them with it instead), so the
//! count stays exact. In a context whose sequences have cells of their own
//! ([`crate::KvCells::PerSequence`]) a copy is a copy: nothing is shared.

use crate::backend::SeqId;

#[derive(Debug, Clone, Copy, Default)]
struct SeqCells {
    len: usize,
    /// Shares its first `k` cells with this sequence.
    source: Option<(SeqId, usize)>,
}

impl SeqCells {
    fn shared(&self) -> usize {
        self.source.map_or(0, |(_, k)| k.min(self.len))
    }
}

/// Distinct KV cells in use, per sequence and in all.
#[derive(Debug, Clone)]
pub struct CellLedger {
    seqs: Vec<SeqCells>,
    /// Copies share cells (a pooled context).
    sharing: bool,
}

impl CellLedger {
    /// A ledger of `n_seq` empty sequences sharing one pool of cells.
    #[must_use]
    pub fn new(n_seq: usize) -> Self {
        Self {
            seqs: vec![SeqCells::default(); n_seq],
            sharing: true,
        }
    }

    /// A ledger of `n_seq` empty sequences with cells of their own.
    #[must_use]
    pub fn per_sequence(n_seq: usize) -> Self {
        Self {
            sharing: false,
            ..Self::new(n_seq)
        }
    }

    /// Distinct cells in use.
    #[must_use]
    pub fn used(&self) -> usize {
        self.seqs.iter().map(|s| s.len - s.shared()).sum()
    }

    /// Cells `seq` owns (would free if it were cleared and nothing shared
    /// them).
    #[must_use]
    pub fn owned(&self, seq: SeqId) -> usize {
        let s = &self.seqs[seq];
        s.len - s.shared()
    }

    /// `seq`'s length.
    #[must_use]
    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs[seq].len
    }

    /// `seq` grew by `n` tokens (new cells).
    pub fn append(&mut self, seq: SeqId, n: usize) {
        self.seqs[seq].len += n;
    }

    /// `dst` (empty) now holds `src`'s first `k` tokens, in shared cells
    /// (or copies of them, for sequences with cells of their own).
    pub fn copy(&mut self, src: SeqId, dst: SeqId, k: usize) {
        debug_assert_eq!(self.seqs[dst].len, 0, "copy into a non-empty sequence");
        self.seqs[dst] = SeqCells {
            len: k,
            source: (self.sharing && k > 0).then_some((src, k)),
        };
    }

    /// `seq` keeps only its first `n` tokens.
    pub fn truncate(&mut self, seq: SeqId, n: usize) {
        if n >= self.seqs[seq].len {
            return;
        }
        // Dependents that shared cells past `n` with `seq` keep them: the
        // first becomes their owner, the others share them with it.
        let mut heirs: Vec<SeqId> = (0..self.seqs.len())
            .filter(|&d| {
                d != seq
                    && self.seqs[d]
                        .source
                        .is_some_and(|(s, k)| s == seq && k.min(self.seqs[d].len) > n)
            })
            .collect();
        heirs.sort_by_key(|&d| std::cmp::Reverse(self.seqs[d].shared()));
        if let Some((&first, rest)) = heirs.split_first() {
            let first_k = self.seqs[first].shared();
            self.seqs[first].source = (n > 0).then_some((seq, n));
            for &d in rest {
                let k = self.seqs[d].shared().min(first_k);
                self.seqs[d].source = Some((first, k));
            }
        }
        let s = &mut self.seqs[seq];
        s.len = n;
        if let Some((src, k)) = s.source {
            s.source = (n > 0).then_some((src, k.min(n)));
        }
    }

    /// `seq` holds nothing any more.
    pub fn clear(&mut self, seq: SeqId) {
        self.truncate(seq, 0);
        self.seqs[seq].source = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_count_twice_when_sequences_have_cells_of_their_own() {
        let mut l = CellLedger::per_sequence(2);
        l.append(0, 100);
        l.copy(0, 1, 60);
        assert_eq!((l.used(), l.owned(1)), (160, 60));
        l.clear(0);
        assert_eq!(l.used(), 60);
    }

    #[test]
    fn shared_prefixes_count_once() {
        let mut l = CellLedger::new(4);
        l.append(0, 100);
        l.copy(0, 1, 60);
        l.append(1, 10);
        assert_eq!(l.used(), 110);
        l.copy(1, 2, 70);
        assert_eq!(l.used(), 110);
        // The source goes: its heirs keep what they held.
        l.clear(0);
        assert_eq!(l.used(), 70);
        l.clear(1);
        assert_eq!(l.used(), 70);
        l.clear(2);
        assert_eq!(l.used(), 0);
    }

    #[test]
    fn several_heirs_of_the_same_cells_share_them() {
        let mut l = CellLedger::new(3);
        l.append(0, 50);
        l.copy(0, 1, 40);
        l.copy(0, 2, 30);
        assert_eq!(l.used(), 50);
        l.truncate(0, 10);
        // Cells 10..40 stay for 1, 10..30 of them shared with 2.
        assert_eq!(l.used(), 40);
        l.clear(0);
        assert_eq!(l.used(), 40);
        l.clear(1);
        assert_eq!(l.used(), 30);
        assert_eq!(l.owned(2), 30);
    }
}
