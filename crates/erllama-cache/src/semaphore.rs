//! The writer pool (docs/tiers.md): a counting semaphore bounding concurrent
//! saves that can never leak a slot.
//!
//! [`WriterPool`] hands out at most [`WriterPool::limit`] [`Permit`]s at a
//! time; [`WriterPool::try_acquire`] fails at once when full and
//! [`WriterPool::acquire_timeout`] waits (std [`Mutex`] + [`Condvar`]) up to
//! a deadline, both answering [`PoolError::MaxConcurrent`]. The limit can be
//! changed at run time with [`WriterPool::set_limit`].
//!
//! # Why no slot can leak
//!
//! - The only way to take a slot is to receive a [`Permit`], and the count
//!   is incremented in the same critical section that builds it, so no slot
//!   is ever taken without an owner.
//! - A [`Permit`] gives its slot back in [`Drop`], which runs on every exit
//!   path: explicit [`Permit::release`], going out of scope, being dropped
//!   by a task that is cancelled, and stack unwinding when the holder
//!   panics.
//! - A permit is neither `Clone` nor `Copy` and [`Permit::release`]
//!   consumes it, so each permit releases exactly once; releasing more than
//!   was taken cannot be written. As a second line of defence the count is
//!   decremented with `saturating_sub`, so it can never underflow.
//! - The lock is never held across user code, so it cannot be poisoned by
//!   a holder's panic; should it be poisoned anyway, the state (two
//!   integers, always consistent between statements) is recovered rather
//!   than propagating the panic, so a release still happens.
//!
//! A permit owns a handle to the pool's shared state, so it is `Send` (a
//! save task may carry it to another thread) and stays valid even if the
//! [`WriterPool`] it came from is dropped first.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Errors from the writer pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every slot was held (until the deadline, for a timed acquire).
    #[error("max_concurrent: all {limit} writer slots are in use")]
    MaxConcurrent {
        /// The limit in force when the acquire gave up.
        limit: usize,
    },
    /// A limit of 0 was requested; the pool needs at least one slot.
    #[error("writer pool limit must be at least 1")]
    InvalidLimit,
}

#[derive(Debug)]
struct State {
    in_use: usize,
    limit: usize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    freed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release_one(&self) {
        let mut st = self.lock();
        st.in_use = st.in_use.saturating_sub(1);
        drop(st);
        // notify_all: waiters are interchangeable and one that is timing
        // out concurrently must not swallow the only wake-up.
        self.freed.notify_all();
    }
}

/// A counting semaphore bounding concurrent saves (docs/tiers.md).
///
/// Cloning gives another handle to the same pool.
#[derive(Debug, Clone)]
pub struct WriterPool {
    shared: Arc<Shared>,
}

impl Default for WriterPool {
    /// A pool with [`WriterPool::default_limit`] slots.
    fn default() -> Self {
        Self::with_valid_limit(Self::default_limit())
    }
}

impl WriterPool {
    /// A pool with `limit` slots.
    ///
    /// # Errors
    ///
    /// [`PoolError::InvalidLimit`] when `limit` is 0.
    pub fn new(limit: usize) -> Result<Self, PoolError> {
        if limit == 0 {
            return Err(PoolError::InvalidLimit);
        }
        Ok(Self::with_valid_limit(limit))
    }

    fn with_valid_limit(limit: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State { in_use: 0, limit }),
                freed: Condvar::new(),
            }),
        }
    }

    /// The default limit: 2 × available cores + 1 (cores taken as 1 when
    /// the count is unknown). Always at least 3.
    #[must_use]
    pub fn default_limit() -> usize {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .saturating_mul(2)
            .saturating_add(1)
    }

    /// Takes a slot if one is free right now.
    ///
    /// # Errors
    ///
    /// [`PoolError::MaxConcurrent`] when every slot is held.
    pub fn try_acquire(&self) -> Result<Permit, PoolError> {
        let mut st = self.shared.lock();
        self.take(&mut st)
            .ok_or(PoolError::MaxConcurrent { limit: st.limit })
    }

    /// Takes a slot only if at least `reserve` others stay free after it:
    /// how an opportunistic save (a continued save) leaves room for the
    /// saves that matter more (cold, finish, evict). Never waits.
    ///
    /// # Errors
    ///
    /// [`PoolError::MaxConcurrent`] when fewer than `reserve + 1` slots are
    /// free.
    pub fn try_acquire_leaving(&self, reserve: usize) -> Result<Permit, PoolError> {
        let mut st = self.shared.lock();
        if st.in_use.saturating_add(reserve) >= st.limit {
            return Err(PoolError::MaxConcurrent { limit: st.limit });
        }
        self.take(&mut st)
            .ok_or(PoolError::MaxConcurrent { limit: st.limit })
    }

    /// Takes a slot, waiting up to `timeout` for one to be freed.
    ///
    /// # Errors
    ///
    /// [`PoolError::MaxConcurrent`] when every slot is still held at the
    /// deadline.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<Permit, PoolError> {
        // A deadline beyond what Instant can represent means "no deadline".
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        loop {
            if let Some(permit) = self.take(&mut st) {
                return Ok(permit);
            }
            st = match deadline {
                None => self
                    .shared
                    .freed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(PoolError::MaxConcurrent { limit: st.limit });
                    }
                    self.shared
                        .freed
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Takes a slot under the held lock if one is free.
    fn take(&self, st: &mut State) -> Option<Permit> {
        if st.in_use < st.limit {
            st.in_use += 1;
            Some(Permit {
                shared: Arc::clone(&self.shared),
            })
        } else {
            None
        }
    }

    /// Changes the limit at run time. Lowering it below the number of
    /// permits held revokes nothing: no new permit is granted until enough
    /// are released. Raising it wakes waiters.
    ///
    /// # Errors
    ///
    /// [`PoolError::InvalidLimit`] when `limit` is 0 (the limit is left
    /// unchanged).
    pub fn set_limit(&self, limit: usize) -> Result<(), PoolError> {
        if limit == 0 {
            return Err(PoolError::InvalidLimit);
        }
        let mut st = self.shared.lock();
        let raised = limit > st.limit;
        st.limit = limit;
        drop(st);
        if raised {
            self.shared.freed.notify_all();
        }
        Ok(())
    }

    /// The number of permits currently held.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.shared.lock().in_use
    }

    /// The current limit.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.shared.lock().limit
    }
}

/// One held writer slot; the slot is given back when the permit is dropped
/// or [released](Permit::release). `Send`, so a save task may carry it to
/// another thread.
#[derive(Debug)]
#[must_use = "dropping a permit releases its slot at once"]
pub struct Permit {
    shared: Arc<Shared>,
}

impl Permit {
    /// Gives the slot back now (the same as dropping the permit).
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.release_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(20);

    fn assert_send<T: Send>() {}

    #[test]
    fn permit_and_pool_are_send() {
        assert_send::<Permit>();
        assert_send::<WriterPool>();
    }

    #[test]
    fn zero_limit_is_invalid() {
        assert_eq!(WriterPool::new(0).err(), Some(PoolError::InvalidLimit));
        let pool = WriterPool::new(2).expect("pool");
        assert_eq!(pool.set_limit(0), Err(PoolError::InvalidLimit));
        assert_eq!(pool.limit(), 2);
    }

    #[test]
    fn default_limit_is_two_cores_plus_one() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(WriterPool::default_limit(), 2 * cores + 1);
        assert_eq!(WriterPool::default().limit(), 2 * cores + 1);
    }

    #[test]
    fn try_acquire_until_full_then_release() {
        let pool = WriterPool::new(2).expect("pool");
        let a = pool.try_acquire().expect("a");
        let b = pool.try_acquire().expect("b");
        assert_eq!(pool.in_use(), 2);
        assert_eq!(
            pool.try_acquire().err(),
            Some(PoolError::MaxConcurrent { limit: 2 })
        );
        a.release();
        assert_eq!(pool.in_use(), 1);
        drop(b);
        assert_eq!(pool.in_use(), 0);
        assert!(pool.try_acquire().is_ok());
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn try_acquire_leaving_keeps_the_reserve_free() {
        let pool = WriterPool::new(3).expect("pool");
        let a = pool.try_acquire_leaving(1).expect("a");
        let b = pool.try_acquire_leaving(1).expect("b");
        assert_eq!(
            pool.try_acquire_leaving(1).err(),
            Some(PoolError::MaxConcurrent { limit: 3 })
        );
        // The reserved slot is still there for a plain acquire.
        let c = pool.try_acquire().expect("c");
        assert_eq!(pool.in_use(), 3);
        drop((a, b, c));
        assert_eq!(pool.in_use(), 0);
        // A reserve as large as the pool refuses at once.
        assert!(pool.try_acquire_leaving(3).is_err());
        assert!(pool.try_acquire_leaving(usize::MAX).is_err());
    }

    #[test]
    fn acquire_timeout_full_gives_max_concurrent() {
        let pool = WriterPool::new(1).expect("pool");
        let _held = pool.try_acquire().expect("held");
        let start = Instant::now();
        assert_eq!(
            pool.acquire_timeout(SHORT).err(),
            Some(PoolError::MaxConcurrent { limit: 1 })
        );
        assert!(start.elapsed() >= SHORT);
        assert_eq!(pool.in_use(), 1);
        assert_eq!(
            pool.acquire_timeout(Duration::ZERO).err(),
            Some(PoolError::MaxConcurrent { limit: 1 })
        );
    }

    #[test]
    fn acquire_timeout_wakes_on_release_from_other_thread() {
        let pool = WriterPool::new(1).expect("pool");
        let held = pool.try_acquire().expect("held");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            held.release();
        });
        let p = pool
            .acquire_timeout(Duration::from_millis(50))
            .expect("freed");
        t.join().expect("releaser");
        assert_eq!(pool.in_use(), 1);
        drop(p);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn panicking_holder_gives_slot_back() {
        let pool = WriterPool::new(1).expect("pool");
        let p2 = pool.clone();
        let r = std::thread::spawn(move || {
            let _permit = p2.try_acquire().expect("slot");
            panic!("holder dies");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(pool.in_use(), 0);
        assert!(pool.try_acquire().is_ok());
    }

    #[test]
    fn permit_carried_to_another_thread() {
        let pool = WriterPool::new(1).expect("pool");
        let permit = pool.try_acquire().expect("slot");
        std::thread::spawn(move || drop(permit))
            .join()
            .expect("carrier");
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn permit_outlives_pool() {
        let pool = WriterPool::new(1).expect("pool");
        let permit = pool.try_acquire().expect("slot");
        drop(pool);
        permit.release();
    }

    #[test]
    fn in_use_never_underflows() {
        let pool = WriterPool::new(3).expect("pool");
        let permits: Vec<_> = (0..3).map(|_| pool.try_acquire().expect("slot")).collect();
        drop(permits);
        assert_eq!(pool.in_use(), 0);
        // A stray release on the shared state cannot push the count below 0.
        pool.shared.release_one();
        assert_eq!(pool.in_use(), 0);
        let _p = pool.try_acquire().expect("slot");
        assert_eq!(pool.in_use(), 1);
        assert!(pool.try_acquire().is_ok());
    }

    #[test]
    fn lowering_limit_blocks_until_enough_released() {
        let pool = WriterPool::new(3).expect("pool");
        let a = pool.try_acquire().expect("a");
        let b = pool.try_acquire().expect("b");
        let c = pool.try_acquire().expect("c");
        pool.set_limit(1).expect("lower");
        assert_eq!(pool.in_use(), 3);
        assert_eq!(
            pool.try_acquire().err(),
            Some(PoolError::MaxConcurrent { limit: 1 })
        );
        a.release();
        b.release();
        assert_eq!(pool.in_use(), 1);
        assert!(pool.try_acquire().is_err());
        c.release();
        let _d = pool.try_acquire().expect("d");
        assert!(pool.try_acquire().is_err());
    }

    #[test]
    fn raising_limit_wakes_waiter() {
        let pool = WriterPool::new(1).expect("pool");
        let _held = pool.try_acquire().expect("held");
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || {
            p2.acquire_timeout(Duration::from_millis(50))
                .map(Permit::release)
        });
        std::thread::sleep(Duration::from_millis(5));
        pool.set_limit(2).expect("raise");
        assert_eq!(waiter.join().expect("waiter"), Ok(()));
        assert_eq!(pool.in_use(), 1);
    }

    #[test]
    fn contention_never_exceeds_limit() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = WriterPool::new(2).expect("pool");
        let peak = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                let peak = Arc::clone(&peak);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if let Ok(p) = pool.acquire_timeout(Duration::from_millis(50)) {
                            peak.fetch_max(pool.in_use(), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("worker");
        }
        assert!(peak.load(Ordering::Relaxed) <= 2);
        assert_eq!(pool.in_use(), 0);
    }
}
