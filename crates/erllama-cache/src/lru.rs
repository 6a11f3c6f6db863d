//! The recency (LRU) lists of the meta index (docs/tiers.md, eviction), so
//! that a claim, a publish, a removal and each eviction step cost O(1)
//! under the writer lock instead of a pass over every row.
//!
//! Per tier there are two doubly linked lists, both least recently used
//! first (ascending `last_used` tick), threaded through one slab of nodes
//! ([`Lists`]); a row records its node's slot, so no lookup by key is
//! needed:
//!
//! - **main**: available rows. A publish appends its row; a claim moves its
//!   row to the back. Ticks are only taken under the writer lock, at the
//!   moment a row is appended or moved to the back, so the list stays
//!   sorted by tick.
//! - **parked**: rows an eviction walk met while they were pinned. Moving
//!   them aside means later walks do not step over them again (a row held
//!   for a long generation would otherwise be skipped by every eviction);
//!   a claim moves a parked row back to the end of main. A release stays
//!   lock-free: when it drops the last pin of a parked row it raises the
//!   tier's `parked_released` flag, and only a walk that finds the flag
//!   raised looks at the parked list. That list is sorted by tick too: a
//!   row can only be pinned after a claim, which gives it a tick newer
//!   than every row parked before, and a walk parks the rows it meets in
//!   list order.
//!
//! A walk ([`Walk`]) merges the lists of its tiers by tick, so victims come
//! least recently used first exactly as a sort of every row by `last_used`
//! would give them. It costs O(victims + rows newly parked), plus the
//! parked rows of a tier whose flag was raised.
//!
//! Everything here runs under the writer lock; the pin word of a row (its
//! refcount plus the parked bit, see `Row`) is the only state shared with
//! the lock-free release.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::meta::Row;
use crate::tier::TierKind;

/// No slot: the end of a list, or a row in no list.
pub(crate) const NIL: u32 = u32::MAX;

/// One slab entry.
struct Node<T> {
    /// `None` while the slot is free.
    value: Option<T>,
    prev: u32,
    next: u32,
    list: u8,
}

/// The two ends and the length of one list.
#[derive(Clone, Copy, Debug)]
struct Ends {
    head: u32,
    tail: u32,
    len: usize,
}

impl Ends {
    const EMPTY: Ends = Ends {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// `N` doubly linked lists of `T` threaded through one slab: push, remove
/// and move between lists in O(1) by slot. Freed slots are reused.
pub(crate) struct Lists<T, const N: usize> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    ends: [Ends; N],
}

impl<T, const N: usize> Default for Lists<T, N> {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            free: Vec::new(),
            ends: [Ends::EMPTY; N],
        }
    }
}

impl<T, const N: usize> std::fmt::Debug for Lists<T, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lists")
            .field("lens", &self.ends.map(|e| e.len))
            .field("slots", &self.nodes.len())
            .finish()
    }
}

impl<T, const N: usize> Lists<T, N> {
    /// Appends `value` to `list`; returns its slot.
    pub(crate) fn push_back(&mut self, list: usize, value: T) -> u32 {
        let slot = if let Some(slot) = self.free.pop() {
            self.nodes[slot as usize].value = Some(value);
            slot
        } else {
            let slot = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&s| s != NIL)
                .expect("fewer than 2^32 - 1 list entries");
            self.nodes.push(Node {
                value: Some(value),
                prev: NIL,
                next: NIL,
                list: 0,
            });
            slot
        };
        self.link_back(list, slot);
        slot
    }

    /// Removes the entry at `slot` (which must be live) and returns it.
    pub(crate) fn remove(&mut self, slot: u32) -> T {
        self.unlink(slot);
        self.free.push(slot);
        self.nodes[slot as usize]
            .value
            .take()
            .expect("removing a live slot")
    }

    /// Moves the entry at `slot` to the back of `list` (its own or another).
    pub(crate) fn move_to_back(&mut self, slot: u32, list: usize) {
        self.unlink(slot);
        self.link_back(list, slot);
    }

    /// The first slot of `list`.
    pub(crate) fn front(&self, list: usize) -> Option<u32> {
        Some(self.ends[list].head).filter(|&s| s != NIL)
    }

    /// The slot after `slot` in its list.
    pub(crate) fn next(&self, slot: u32) -> Option<u32> {
        Some(self.nodes[slot as usize].next).filter(|&s| s != NIL)
    }

    /// The entry at `slot` (which must be live).
    pub(crate) fn get(&self, slot: u32) -> &T {
        self.nodes[slot as usize]
            .value
            .as_ref()
            .expect("reading a live slot")
    }

    /// The entry at `slot`, if the slot exists and is live.
    #[cfg(test)]
    pub(crate) fn try_get(&self, slot: u32) -> Option<&T> {
        self.nodes.get(slot as usize)?.value.as_ref()
    }

    /// Which list `slot` (live) is in.
    #[cfg(test)]
    pub(crate) fn list_of(&self, slot: u32) -> usize {
        usize::from(self.nodes[slot as usize].list)
    }

    /// Entries in `list`.
    #[cfg(test)]
    pub(crate) fn len(&self, list: usize) -> usize {
        self.ends[list].len
    }

    /// `list`'s entries front to back, with their slots.
    #[cfg(test)]
    pub(crate) fn iter(&self, list: usize) -> impl Iterator<Item = (u32, &T)> + '_ {
        std::iter::successors(self.front(list), move |&s| self.next(s)).map(|s| (s, self.get(s)))
    }

    fn link_back(&mut self, list: usize, slot: u32) {
        let tail = self.ends[list].tail;
        let node = &mut self.nodes[slot as usize];
        node.prev = tail;
        node.next = NIL;
        node.list = u8::try_from(list).expect("fewer than 256 lists");
        if tail == NIL {
            self.ends[list].head = slot;
        } else {
            self.nodes[tail as usize].next = slot;
        }
        self.ends[list].tail = slot;
        self.ends[list].len += 1;
    }

    fn unlink(&mut self, slot: u32) {
        let Node {
            prev, next, list, ..
        } = self.nodes[slot as usize];
        let list = usize::from(list);
        if prev == NIL {
            self.ends[list].head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.ends[list].tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        self.ends[list].len -= 1;
    }
}

/// The main list of `tier`.
const fn main_list(tier: TierKind) -> usize {
    tier.index() * 2
}

/// The parked list of `tier`.
const fn parked_list(tier: TierKind) -> usize {
    tier.index() * 2 + 1
}

/// The recency lists of every tier (in the writer state).
#[derive(Debug, Default)]
pub(crate) struct Recency {
    lists: Lists<Arc<Row>, 6>,
}

impl Recency {
    /// Appends a row that just became available (publish, registration):
    /// it is the most recently used of its tier.
    pub(crate) fn insert(&mut self, row: &Arc<Row>) {
        debug_assert_eq!(row.lru_slot(), NIL, "a row is listed once");
        let slot = self.lists.push_back(main_list(row.tier), Arc::clone(row));
        row.set_lru_slot(slot);
    }

    /// Makes a listed row the most recently used of its tier (a claim,
    /// which also clears its parked bit).
    pub(crate) fn touch(&mut self, row: &Row) {
        self.lists.move_to_back(row.lru_slot(), main_list(row.tier));
    }

    /// Unlists a row leaving the index; a row in no list is left alone.
    pub(crate) fn remove(&mut self, row: &Row) {
        let slot = row.lru_slot();
        if slot == NIL {
            return;
        }
        let listed = self.lists.remove(slot);
        debug_assert!(
            std::ptr::eq(Arc::as_ptr(&listed), row),
            "a row's slot is its own"
        );
        row.set_lru_slot(NIL);
    }

    /// Checks the lists against `rows` (every row of the index) and the
    /// parked flags: every available row is listed once, in its tier's
    /// main list or — exactly when its parked bit is set — parked list;
    /// nothing else is listed; each list is sorted by tick; with a tier's
    /// flag down, its parked rows are all pinned.
    ///
    /// # Errors
    ///
    /// What disagrees.
    #[cfg(test)]
    pub(crate) fn check(
        &self,
        rows: &[Arc<Row>],
        parked_released: &[AtomicBool; 3],
    ) -> Result<(), String> {
        use crate::meta::RowStatus;
        let mut listed = 0;
        for row in rows {
            let slot = row.lru_slot();
            if row.status() != RowStatus::Available {
                if slot != NIL {
                    return Err(format!("{} is {:?} but listed", row.key, row.status()));
                }
                continue;
            }
            listed += 1;
            let Some(entry) = self.lists.try_get(slot) else {
                return Err(format!("available {} is not listed", row.key));
            };
            if !Arc::ptr_eq(entry, row) {
                return Err(format!("{}'s slot holds another row", row.key));
            }
            let want = if row.is_parked() {
                parked_list(row.tier)
            } else {
                main_list(row.tier)
            };
            if self.lists.list_of(slot) != want {
                return Err(format!(
                    "{} is in list {} not {want}",
                    row.key,
                    self.lists.list_of(slot)
                ));
            }
        }
        let total: usize = (0..6).map(|l| self.lists.len(l)).sum();
        if total != listed {
            return Err(format!("{total} listed, {listed} available rows"));
        }
        for tier in TierKind::ALL {
            for list in [main_list(tier), parked_list(tier)] {
                let mut last = 0;
                let mut n = 0;
                for (_, row) in self.lists.iter(list) {
                    n += 1;
                    if row.tier != tier {
                        return Err(format!("{} of tier {} in list {list}", row.key, row.tier));
                    }
                    if row.last_used() <= last {
                        return Err(format!("list {list} is not sorted by tick"));
                    }
                    last = row.last_used();
                    if list == parked_list(tier)
                        && !parked_released[tier.index()].load(Ordering::SeqCst)
                        && row.refcount() == 0
                    {
                        return Err(format!("{} parked unpinned, flag down", row.key));
                    }
                }
                if n != self.lists.len(list) {
                    return Err(format!(
                        "list {list} holds {n}, counts {}",
                        self.lists.len(list)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An eviction candidate from a [`Walk`].
pub(crate) struct Candidate {
    /// The row: available and unpinned when it was taken.
    pub(crate) row: Arc<Row>,
    /// Whether it came from a parked list.
    parked: bool,
}

/// One tier's cursors.
struct TierWalk {
    tier: TierKind,
    /// Whether this walk looks at the parked list (its flag was raised).
    parked_walked: bool,
    /// The next slot to look at in the parked list (`NIL`: past its end).
    parked_next: u32,
    /// The next slot to look at in the main list (`NIL`: past its end).
    main_next: u32,
    /// A parked candidate was kept (not evicted): raise the flag again.
    parked_kept: bool,
}

impl TierWalk {
    /// Moves the parked cursor to the next unpinned row (pinned ones stay
    /// where they are).
    fn settle_parked(&mut self, lists: &Lists<Arc<Row>, 6>) {
        while self.parked_next != NIL && lists.get(self.parked_next).refcount() != 0 {
            self.parked_next = lists.next(self.parked_next).unwrap_or(NIL);
        }
    }

    /// Moves the main cursor to the next unpinned row, parking the pinned
    /// rows it passes.
    fn settle_main(&mut self, lists: &mut Lists<Arc<Row>, 6>) {
        while self.main_next != NIL {
            let slot = self.main_next;
            let row = lists.get(slot);
            if row.refcount() == 0 || !row.try_park() {
                return;
            }
            self.main_next = lists.next(slot).unwrap_or(NIL);
            lists.move_to_back(slot, parked_list(self.tier));
        }
    }

    /// The least recently used unpinned row left, and whether it is parked.
    fn head(&mut self, lists: &mut Lists<Arc<Row>, 6>) -> Option<(u32, bool)> {
        self.settle_main(lists);
        self.settle_parked(lists);
        let tick = |slot: u32| (slot != NIL).then(|| lists.get(slot).last_used());
        match (tick(self.parked_next), tick(self.main_next)) {
            (Some(p), Some(m)) if p < m => Some((self.parked_next, true)),
            (Some(_), None) => Some((self.parked_next, true)),
            (_, Some(_)) => Some((self.main_next, false)),
            (None, None) => None,
        }
    }
}

/// A walk over the lists of some tiers yielding unpinned available rows,
/// least recently used first (see the module docs).
pub(crate) struct Walk {
    tiers: Vec<TierWalk>,
}

impl Walk {
    /// Starts a walk over `tiers` (each counted once). Lowers the parked
    /// flags of the tiers whose parked lists it will look at; [`Walk::finish`]
    /// raises them again where unpinned parked rows may remain.
    pub(crate) fn new(
        recency: &Recency,
        tiers: &[TierKind],
        parked_released: &[AtomicBool; 3],
    ) -> Self {
        let mut walks: Vec<TierWalk> = Vec::with_capacity(tiers.len());
        for &tier in tiers {
            if walks.iter().any(|w| w.tier == tier) {
                continue;
            }
            // SeqCst, paired with the release: a release that unpins a
            // parked row after this walk read it pinned raises the flag
            // after this swap lowered it.
            let parked_walked = parked_released[tier.index()].swap(false, Ordering::SeqCst);
            let parked_next = if parked_walked {
                recency.lists.front(parked_list(tier)).unwrap_or(NIL)
            } else {
                NIL
            };
            walks.push(TierWalk {
                tier,
                parked_walked,
                parked_next,
                main_next: recency.lists.front(main_list(tier)).unwrap_or(NIL),
                parked_kept: false,
            });
        }
        Walk { tiers: walks }
    }

    /// The next candidate, least recently used first; `None` when no
    /// unpinned row is left. Cursors move past it, so the caller may
    /// remove it from the lists (or keep it: see [`Walk::keep`]).
    pub(crate) fn take(&mut self, recency: &mut Recency) -> Option<Candidate> {
        let lists = &mut recency.lists;
        let mut best: Option<(usize, u32, bool, u64)> = None;
        for (i, w) in self.tiers.iter_mut().enumerate() {
            if let Some((slot, parked)) = w.head(lists) {
                let tick = lists.get(slot).last_used();
                if best.is_none_or(|(.., t)| tick < t) {
                    best = Some((i, slot, parked, tick));
                }
            }
        }
        let (i, slot, parked, _) = best?;
        let w = &mut self.tiers[i];
        let after = lists.next(slot).unwrap_or(NIL);
        if parked {
            w.parked_next = after;
        } else {
            w.main_next = after;
        }
        Some(Candidate {
            row: Arc::clone(lists.get(slot)),
            parked,
        })
    }

    /// Records that `candidate` stays (not evicted), so a parked one is
    /// looked at again by the next walk.
    pub(crate) fn keep(&mut self, candidate: &Candidate) {
        if candidate.parked {
            if let Some(w) = self.tiers.iter_mut().find(|w| w.tier == candidate.row.tier) {
                w.parked_kept = true;
            }
        }
    }

    /// Ends the walk: raises the parked flag of each tier whose parked
    /// list may still hold unpinned rows (walked only in part, or a parked
    /// candidate kept).
    pub(crate) fn finish(self, parked_released: &[AtomicBool; 3]) {
        for w in self.tiers {
            if w.parked_walked && (w.parked_next != NIL || w.parked_kept) {
                parked_released[w.tier.index()].store(true, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect<const N: usize>(l: &Lists<u32, N>, list: usize) -> Vec<u32> {
        l.iter(list).map(|(_, v)| *v).collect()
    }

    #[test]
    fn lists_push_move_remove_and_reuse_slots() {
        let mut l: Lists<u32, 2> = Lists::default();
        let a = l.push_back(0, 1);
        let b = l.push_back(0, 2);
        let c = l.push_back(0, 3);
        assert_eq!(collect(&l, 0), [1, 2, 3]);
        l.move_to_back(a, 0);
        assert_eq!(collect(&l, 0), [2, 3, 1]);
        l.move_to_back(c, 1);
        assert_eq!((collect(&l, 0), collect(&l, 1)), (vec![2, 1], vec![3]));
        assert_eq!((l.len(0), l.len(1), l.list_of(c)), (2, 1, 1));
        assert_eq!(l.remove(b), 2);
        assert_eq!(collect(&l, 0), [1]);
        assert!(l.try_get(b).is_none());
        let d = l.push_back(1, 4);
        assert_eq!(d, b, "a freed slot is reused");
        assert_eq!(collect(&l, 1), [3, 4]);
        assert_eq!(l.remove(a), 1);
        assert_eq!((l.front(0), l.len(0)), (None, 0));
        l.move_to_back(c, 0);
        assert_eq!((collect(&l, 0), collect(&l, 1)), (vec![3], vec![4]));
    }
}
