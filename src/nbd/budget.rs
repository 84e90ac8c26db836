//! [`MemoryBudget`]: one byte budget for the WRITE payloads of every
//! connection of a server, shared fairly between them, and the buffer pool
//! those payloads are read into.
//!
//! Without it each connection is bounded on its own
//! ([`ServerConfig::max_bytes_in_flight`]), so memory grows with the number
//! of connections: a backup of N drives holds up to N × QEMU's 16 MiB in
//! flight. With it (set in [`ServerConfig::memory`]), a WRITE's payload is
//! charged to the one budget before it is read off the socket, and the
//! charge is released when the backend has taken the data (for the backup
//! target: handed it to the archive writer's bounded channel, or copied it
//! into a partial-cluster buffer), not when the reply is written, so a
//! client that does not read its replies holds no budget.
//!
//! # Fairness
//!
//! A connection *uses* the budget while it holds a charge or waits for one;
//! the users share it equally: a connection may take a new charge while
//! what it holds plus the new charge stays within `total / users`, and
//! always when it holds nothing (so every user keeps at least one request
//! going, and one alone may use the whole budget). Charges are then granted
//! first come, first served (tokio's semaphore is FIFO), so a large charge
//! is not overtaken forever by small ones.
//!
//! # Why it cannot deadlock
//!
//! Charges are waited for only by a connection's reader, before it reads a
//! payload; a charge is held only by a request whose payload has been read
//! (or is being read) and whose backend call needs no further charge (the
//! assembler waits for its writer channel, which its thread always drains,
//! or for partial-cluster room, which gives up after a timeout). So every
//! charge comes back without any other charge being granted. A charge is
//! clamped to the whole budget, so a request larger than the budget runs
//! alone. Refused WRITEs are drained without a charge.
//!
//! Not a deadlock, but a stall: a WRITE of part of a cluster keeps its
//! charge while it waits for partial-cluster room, and the WRITE that
//! would complete a buffered cluster (and free that room) needs a charge
//! too. When waiters hold the whole budget (a tiny `--memory` and a client
//! writing unaligned pieces), they give up after the partial wait
//! ([`crate::assembler::DEFAULT_PARTIAL_WAIT`], 30 s) with EIO. QEMU writes
//! whole clusters and never gets there. The partial-cluster buffers
//! themselves (`--buffer-limit`) are outside this budget.
//!
//! A charge is taken before the payload arrives, so a client that
//! announces a large WRITE and trickles its payload would hold the budget
//! for as long as it likes: a charged payload must arrive within
//! [`ServerConfig::payload_timeout`], or the connection is closed.
//!
//! [`ServerConfig::max_bytes_in_flight`]: super::ServerConfig::max_bytes_in_flight
//! [`ServerConfig::memory`]: super::ServerConfig::memory
//! [`ServerConfig::payload_timeout`]: super::ServerConfig::payload_timeout

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::pool::BufferPool;

/// Share of the budget that idle payload buffers may keep in the shared
/// pool (1/`POOL_FRACTION`): enough to recycle the buffers of the requests
/// in flight (fresh 1 MiB buffers page-fault in on every use), small
/// enough that idle buffers add little to the peak.
pub const POOL_FRACTION: usize = 4;

/// A byte budget shared by the connections of a server; see the module
/// docs. Cheap to clone (all clones are the same budget).
#[derive(Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    /// Bytes in all.
    total: usize,
    /// One permit per byte not charged.
    permits: Arc<Semaphore>,
    /// Who uses the budget now, and how much each holds.
    users: Mutex<HashMap<u64, Use>>,
    /// Woken whenever a user's holding or the number of users changes.
    changed: Notify,
    /// Most bytes charged at once so far.
    peak: AtomicUsize,
    /// Ids for [`MemoryBudget::share`].
    next_id: AtomicU64,
    /// Idle payload buffers, shared by every connection.
    pool: Arc<BufferPool>,
}

/// One connection's use of the budget (present while it holds or waits).
#[derive(Debug, Default)]
struct Use {
    held: usize,
    waiting: usize,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("total", &self.inner.total)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl PartialEq for MemoryBudget {
    /// The same budget (not merely the same size).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for MemoryBudget {}

impl MemoryBudget {
    /// A budget of `total` bytes (at least 1, at most what a semaphore
    /// counts).
    pub fn new(total: usize) -> MemoryBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        MemoryBudget {
            inner: Arc::new(Inner {
                total,
                permits: Arc::new(Semaphore::new(total)),
                users: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                peak: AtomicUsize::new(0),
                next_id: AtomicU64::new(0),
                pool: BufferPool::new(total / POOL_FRACTION),
            }),
        }
    }

    /// Its size in bytes.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> usize {
        self.inner.total - self.inner.permits.available_permits()
    }

    /// Most bytes charged at once so far.
    pub fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Connections holding or waiting for a charge now.
    pub fn users(&self) -> usize {
        self.inner.lock().len()
    }

    /// The pool WRITE payloads are read into (shared, so idle buffers do
    /// not grow with the number of connections).
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.inner.pool
    }

    /// A new connection's handle on the budget.
    pub fn share(&self) -> Share {
        Share {
            inner: Arc::clone(&self.inner),
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Use>> {
        // The map is consistent at every unlock; a panic elsewhere does
        // not change that.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets a user that neither holds nor waits, and wakes the others
    /// (their share may have grown).
    fn settle(&self, users: &mut HashMap<u64, Use>, id: u64) {
        if let Some(u) = users.get(&id)
            && u.held == 0
            && u.waiting == 0
        {
            users.remove(&id);
        }
    }
}

/// One connection's handle on a [`MemoryBudget`]; see the module docs.
pub struct Share {
    inner: Arc<Inner>,
    id: u64,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share").field("id", &self.id).finish()
    }
}

impl Share {
    /// The budget this share belongs to.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.inner.pool
    }

    /// Waits for a charge of `len` bytes (at most the whole budget): first
    /// for this connection's fair share, then for the bytes themselves.
    /// Cancel-safe: dropping the future gives back what it had.
    pub async fn acquire(&self, len: usize) -> Charge {
        let cost = len.clamp(1, self.inner.total);
        let mut charge = {
            let _waiting = Waiting::new(self);
            loop {
                let notified = self.inner.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut users = self.inner.lock();
                    let share = self.inner.total / users.len().max(1);
                    let u = users.get_mut(&self.id).expect("a waiting user is listed");
                    if u.held == 0 || u.held + cost <= share {
                        u.held += cost;
                        // No await from here until the charge exists, so
                        // a cancelled acquire never leaks `held`.
                        break Charge {
                            inner: Arc::clone(&self.inner),
                            id: self.id,
                            cost,
                            permit: None,
                        };
                    }
                }
                notified.await;
            }
            // `_waiting` is dropped here; the user stays listed (it holds).
        };
        let permit = Arc::clone(&self.inner.permits)
            .acquire_many_owned(cost as u32)
            .await
            .expect("the budget semaphore is never closed");
        charge.permit = Some(permit);
        let used = self.inner.total - self.inner.permits.available_permits();
        self.inner.peak.fetch_max(used, Ordering::Relaxed);
        charge
    }
}

/// Marks a user as waiting while [`Share::acquire`] runs.
struct Waiting<'a> {
    share: &'a Share,
}

impl<'a> Waiting<'a> {
    fn new(share: &'a Share) -> Self {
        share.inner.lock().entry(share.id).or_default().waiting += 1;
        Waiting { share }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let inner = &self.share.inner;
        let mut users = inner.lock();
        if let Some(u) = users.get_mut(&self.share.id) {
            u.waiting -= 1;
        }
        inner.settle(&mut users, self.share.id);
        drop(users);
        inner.changed.notify_waiters();
    }
}

/// Bytes charged to a [`MemoryBudget`]; given back when dropped.
pub struct Charge {
    inner: Arc<Inner>,
    id: u64,
    cost: usize,
    /// The bytes themselves; `None` while still waiting for them.
    permit: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge").field("bytes", &self.cost).finish()
    }
}

impl Charge {
    /// Bytes charged.
    pub fn bytes(&self) -> usize {
        self.cost
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut users = self.inner.lock();
        if let Some(u) = users.get_mut(&self.id) {
            u.held -= self.cost;
        }
        self.inner.settle(&mut users, self.id);
        drop(users);
        self.inner.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIB: usize = 1 << 20;

    /// Polls `fut` once: `Some` when it is ready at once.
    fn now<F: std::future::Future>(fut: F) -> Option<F::Output> {
        futures_util::FutureExt::now_or_never(fut)
    }

    #[tokio::test]
    async fn one_connection_alone_may_use_it_all() {
        let b = MemoryBudget::new(16 * MIB);
        let s = b.share();
        let held: Vec<Charge> = (0..16).map(|_| now(s.acquire(MIB)).unwrap()).collect();
        assert_eq!((b.in_use(), b.peak(), b.users()), (16 * MIB, 16 * MIB, 1));
        assert!(now(s.acquire(1)).is_none(), "the budget is used up");
        drop(held);
        assert_eq!((b.in_use(), b.users()), (0, 0));
    }

    #[tokio::test]
    async fn a_second_connection_gets_its_turn_and_then_half() {
        let b = MemoryBudget::new(8 * MIB);
        let (a, c) = (b.share(), b.share());
        let mut held_a: Vec<Charge> = (0..8).map(|_| now(a.acquire(MIB)).unwrap()).collect();
        // c waits for bytes; a, over its new half share, waits for its share.
        let mut want_c = Box::pin(c.acquire(MIB));
        assert!(now(&mut want_c).is_none());
        let mut want_a = Box::pin(a.acquire(MIB));
        assert!(now(&mut want_a).is_none());
        assert_eq!(b.users(), 2);
        // One of a's requests completes: the byte goes to c, not to a.
        held_a.pop();
        let held_c = now(&mut want_c).expect("c was first in line");
        assert!(now(&mut want_a).is_none());
        // a gets more only once it is back under its half (4 MiB).
        for _ in 0..3 {
            held_a.pop();
            assert!(now(&mut want_a).is_none(), "a still holds over half");
        }
        held_a.pop();
        let got_a = now(&mut want_a).expect("a is back within its share");
        assert_eq!(b.in_use(), 5 * MIB);
        drop((held_a, held_c, got_a));
        assert_eq!((b.in_use(), b.users()), (0, 0));
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_runs_alone() {
        let b = MemoryBudget::new(4 * MIB);
        let (a, c) = (b.share(), b.share());
        let small = now(c.acquire(MIB)).unwrap();
        let mut big = Box::pin(a.acquire(32 * MIB));
        assert!(now(&mut big).is_none());
        // FIFO: a small request behind the big one waits too.
        let mut after = Box::pin(c.acquire(1));
        assert!(now(&mut after).is_none());
        drop(small);
        let big = now(&mut big).expect("all of the budget is free");
        assert_eq!((big.bytes(), b.in_use()), (4 * MIB, 4 * MIB));
        assert!(now(&mut after).is_none());
        drop(big);
        assert!(now(&mut after).is_some());
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_everything_back() {
        let b = MemoryBudget::new(2 * MIB);
        let (a, c) = (b.share(), b.share());
        let held = now(a.acquire(2 * MIB)).unwrap();
        // c waits for bytes, a for its share; both give up.
        let mut wc = Box::pin(c.acquire(MIB));
        let mut wa = Box::pin(a.acquire(MIB));
        assert!(now(&mut wc).is_none() && now(&mut wa).is_none());
        assert_eq!(b.users(), 2);
        drop((wc, wa));
        assert_eq!(b.users(), 1);
        drop(held);
        assert_eq!((b.in_use(), b.users()), (0, 0));
        assert!(now(c.acquire(2 * MIB)).is_some());
    }

    /// Many connections, each with several writers, on a budget far
    /// smaller than what they want: everyone finishes, nobody ever holds
    /// more than the budget, and every connection is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_connections_never_deadlock_and_all_progress() {
        let b = MemoryBudget::new(3 * MIB);
        let served = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for conn in 0..200usize {
            let share = b.share();
            let served = served.clone();
            tasks.push(tokio::spawn(async move {
                // One reader per connection, requests running in their own
                // tasks (as the transmission phase does).
                let mut reqs = Vec::new();
                for i in 0..20usize {
                    let len = [4096, 64 << 10, MIB, 5 * MIB][(conn + i) % 4];
                    let charge = share.acquire(len).await;
                    reqs.push(tokio::spawn(async move {
                        tokio::task::yield_now().await;
                        drop(charge);
                    }));
                }
                for r in reqs {
                    r.await.unwrap();
                }
                served.fetch_add(1, Ordering::Relaxed);
            }));
        }
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("a connection never got its budget");
        assert_eq!(served.load(Ordering::Relaxed), 200);
        assert!(b.peak() <= 3 * MIB && b.peak() > MIB, "peak {}", b.peak());
        assert_eq!((b.in_use(), b.users()), (0, 0));
    }
}
