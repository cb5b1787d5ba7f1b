//! The kernels' parallel sections, and the spinning team that runs a decode step's.
//!
//! A decode step is a few hundred small parallel sections (each projection, the attention,
//! the LM head), tens to hundreds of microseconds each. Run as rayon fork-joins, every
//! section has to wake workers that went to sleep after the last one; on 16 cores that cost
//! rivals the work itself, and decode stopped scaling past 8 threads (BENCHMARKS.md, issue
//! 20). Inside [`with_team`] the pool's other workers instead spin for the whole step and take
//! a section's jobs the moment the leading thread posts them, as llama.cpp's threads spin
//! between its operations. Outside a team (prefill, tests, callers without a pool) the same
//! calls are ordinary rayon parallel iterators.
//!
//! Jobs write disjoint outputs ([`DisjointChunks`]), so no result depends on which thread
//! ran which job, in a team or not.

use rayon::prelude::*;
use std::any::Any;
use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// What the current thread is doing with respect to a team.
#[derive(Clone, Copy)]
enum Role {
    /// No team: parallel sections go to rayon.
    Alone,
    /// Leads the team at this address: parallel sections are posted to it.
    Leading(*const Team),
    /// Runs a job for a team: nested sections run on this thread, in order (the other
    /// workers are busy spinning and would never take rayon jobs).
    Helping,
}

thread_local! {
    static ROLE: Cell<Role> = const { Cell::new(Role::Alone) };
}

/// Runs `f(i)` for every `i < n`, in parallel.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    match ROLE.with(Cell::get) {
        Role::Leading(team) if n > 1 => leading(team).run(n, &f),
        Role::Leading(_) | Role::Helping => (0..n).for_each(f),
        Role::Alone => (0..n).into_par_iter().for_each(&f),
    }
}

/// The team a `Leading` role points to.
fn leading<'t>(team: *const Team) -> &'t Team {
    // SAFETY: a `Leading` role is set only while `with_team` runs its closure on this
    // thread, and the team it points to lives on `with_team`'s stack until after the role
    // is cleared; the reference is used within one call of this module's functions.
    #[allow(unsafe_code)]
    unsafe {
        &*team
    }
}

/// `f(i)` for every `i < n`, in parallel, collected in order.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if matches!(ROLE.with(Cell::get), Role::Alone) {
        return (0..n).into_par_iter().map(&f).collect();
    }
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let slots = DisjointChunks::new(&mut out, 1);
    for_each(n, |i| slots.take(i)[0] = Some(f(i)));
    out.into_iter().map(|r| r.expect("every index ran")).collect()
}

/// `f(i, chunk)` for each consecutive `chunk_len` chunk of `data` (the last may be shorter).
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunks = DisjointChunks::new(data, chunk_len);
    for_each(chunks.len(), |i| f(i, chunks.take(i)));
}

/// A mutable slice cut into chunks that parallel jobs take one each: chunk `i` can be taken
/// once (a second `take(i)` panics), so jobs never alias each other's output.
pub struct DisjointChunks<'a, T> {
    ptr: *mut T,
    len: usize,
    chunk_len: usize,
    taken: Vec<AtomicBool>,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: the chunks handed out are disjoint (each at most once, enforced by `taken`), so
// sharing the cutter between threads hands each `&mut` chunk to one thread only, as
// `par_chunks_mut` would; that needs `T: Send`.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for DisjointChunks<'_, T> {}

impl<'a, T> DisjointChunks<'a, T> {
    /// Cuts `data` into chunks of `chunk_len` (> 0).
    pub fn new(data: &'a mut [T], chunk_len: usize) -> Self {
        assert!(chunk_len > 0, "chunks must have at least one element");
        let n = data.len().div_ceil(chunk_len);
        Self { ptr: data.as_mut_ptr(), len: data.len(), chunk_len, taken: (0..n).map(|_| AtomicBool::new(false)).collect(), _borrow: PhantomData }
    }

    /// How many chunks.
    pub fn len(&self) -> usize {
        self.taken.len()
    }

    /// Whether there are no chunks.
    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }

    /// Chunk `i`. Panics if `i` is out of range or was taken before.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&self, i: usize) -> &'a mut [T] {
        assert!(!self.taken[i].swap(true, Ordering::Relaxed), "chunk {i} taken twice");
        let start = i * self.chunk_len;
        let end = (start + self.chunk_len).min(self.len);
        // SAFETY: `start..end` lies within the borrowed slice, and no other reference to it
        // exists: this is the only time chunk `i` is handed out while the borrow `'a` lasts.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
        }
    }
}

/// Pools smaller than this run a pass through rayon even inside [`with_team`]: with one
/// helper there is little waking to save, and on the 2-core build machine the team was
/// slower (decode at 2K 9.1 against 8.5 ms; its two vCPUs may share a core, so a spinning
/// helper slows the leader's serial work). On 16 cores it is 1.4-1.6x faster, on 4 about
/// even (BENCHMARKS.md, issue 20).
pub const MIN_TEAM: usize = 4;

/// Runs `f` on this thread with the current rayon pool's other workers spinning beside it,
/// ready for the parallel sections `f` posts through this module. Called outside a pool, or
/// inside a team, or in a pool of fewer than [`MIN_TEAM`] threads, it just runs `f`; so it does with
/// `DUO_NO_TEAM` set (every section then a rayon fork-join, to measure the difference).
///
/// The workers spin (one core each) until `f` returns: meant for a decode step's
/// milliseconds, not for anything that waits on I/O. It returns only once every worker of
/// the pool has taken its turn in the team (a worker busy elsewhere joins late and leaves
/// at once), so the pool should be one that this pass has to itself, as the CPU backend's
/// is; work that others `install` on the pool meanwhile waits for the pass.
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var_os("DUO_NO_TEAM").is_some());
    let me = match (ROLE.with(Cell::get), rayon::current_thread_index()) {
        (Role::Alone, Some(me)) if !off && rayon::current_num_threads() >= MIN_TEAM => me,
        _ => return f(),
    };
    let team = Team::new(rayon::current_num_threads());
    rayon::in_place_scope(|scope| {
        scope.spawn_broadcast(|_, ctx| {
            if ctx.index() != me {
                team.help();
            }
        });
        // Stops the helpers and clears the role however `f` ends (a panic included), so the
        // scope's wait for its broadcast jobs ends.
        struct Leading<'t>(&'t Team);
        impl Drop for Leading<'_> {
            fn drop(&mut self) {
                ROLE.with(|r| r.set(Role::Alone));
                self.0.stop.store(true, Ordering::Release);
            }
        }
        let _leading = Leading(&team);
        ROLE.with(|r| r.set(Role::Leading(&team)));
        f()
    })
}

/// The leader's posted section and the helpers' claims on it.
struct Team {
    /// High 32 bits: the jobs of the posted section; low 32: the next unclaimed job.
    claim: AtomicU64,
    /// Jobs of the posted section finished (by anyone).
    done: AtomicUsize,
    /// The posted section's `&dyn Fn(usize)`, through a pointer to it on the leader's stack.
    task: AtomicPtr<()>,
    /// Jobs taken per claim, so that many tiny jobs do not all contend on `claim`.
    grain: AtomicUsize,
    threads: usize,
    stop: AtomicBool,
    /// The first panic of a job, re-raised on the leader once the section has ended.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

type Task<'f> = &'f (dyn Fn(usize) + Sync);

impl Team {
    fn new(threads: usize) -> Self {
        Self {
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            grain: AtomicUsize::new(1),
            threads,
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// Posts `n` jobs of `f`, takes part in them, and returns when all have finished.
    fn run(&self, n: usize, f: Task<'_>) {
        let n32 = u32::try_from(n).expect("fewer than 2^32 jobs in a section");
        self.done.store(0, Ordering::Relaxed);
        self.grain.store((n / (4 * self.threads)).max(1), Ordering::Relaxed);
        self.task.store(&f as *const Task<'_> as *mut (), Ordering::Relaxed);
        // Publishes the fields above with the new section (helpers read them only after a
        // successful claim, which reads this store or a later claim's).
        self.claim.store((n32 as u64) << 32, Ordering::Release);
        // While the leader runs jobs, sections nested in them run in place (posting one
        // would overwrite the section in progress).
        let role = ROLE.with(|r| r.replace(Role::Helping));
        while self.work() {}
        ROLE.with(|r| r.set(role));
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < n {
            // A helper holding claimed jobs may have lost its core (more threads than
            // cores): after a while, let it have this one.
            spins = spins.saturating_add(1);
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Every job has returned: no helper holds `f` any more.
        if let Some(p) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }

    /// Claims a run of jobs of the posted section and runs them; false if none was left.
    fn work(&self) -> bool {
        let mut c = self.claim.load(Ordering::Acquire);
        loop {
            let (n, next) = ((c >> 32) as usize, (c & 0xffff_ffff) as usize);
            if next >= n {
                return false;
            }
            let end = (next + self.grain.load(Ordering::Relaxed)).min(n);
            match self.claim.compare_exchange_weak(c, ((n as u64) << 32) | end as u64, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // SAFETY: the claim succeeded on a section with jobs `next..end` not yet
                    // done, so its leader is still inside `run`, waiting for them, and the
                    // task pointer (published before the section) points to its live `f`. A
                    // claim that raced with a new section (same counts) is a claim on the new
                    // section, whose task is the one read here, after the claim.
                    #[allow(unsafe_code)]
                    let f: Task<'_> = unsafe { *(self.task.load(Ordering::Relaxed) as *const Task<'_>) };
                    for i in next..end {
                        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                            let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                            if first.is_none() {
                                *first = Some(p);
                            } else {
                                // Dropped here, where a payload whose drop panics cannot
                                // unwind past the count below (the leader waits on it).
                                drop(first);
                                let _ = catch_unwind(AssertUnwindSafe(move || drop(p)));
                            }
                        }
                    }
                    self.done.fetch_add(end - next, Ordering::Release);
                    return true;
                }
                Err(now) => c = now,
            }
        }
    }

    /// A helper's loop: take jobs as sections are posted, until the leader stops.
    fn help(&self) {
        // Rayon may run this broadcast job inside a wait of a thread that leads another
        // team: its role comes back when the job ends.
        let role = ROLE.with(|r| r.replace(Role::Helping));
        let mut idle = 0u32;
        loop {
            if self.work() {
                idle = 0;
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            idle = idle.saturating_add(1);
            if idle < 1 << 16 {
                std::hint::spin_loop();
            } else {
                // A long wait (the leader sampling, or a slow serial part): let any other
                // runnable thread have the core.
                std::thread::yield_now();
            }
        }
        ROLE.with(|r| r.set(role));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool")
    }

    /// Many sections of every size, in and out of a team, give the same outputs as a
    /// sequential loop: every job runs exactly once.
    #[test]
    fn team_runs_every_job_once() {
        let sizes: Vec<usize> = (0..300).map(|s| (s * 37) % 1000).collect();
        let expect = |n: usize| -> Vec<u64> { (0..n).map(|i| (i as u64) * 3 + 1).collect() };
        for threads in [4, 5, 6] {
            let p = pool(threads);
            let (team, alone) = p.install(|| {
                let run = || -> Vec<Vec<u64>> {
                    sizes
                        .iter()
                        .map(|&n| {
                            let mut out = vec![0u64; n];
                            let counter = AtomicUsize::new(0);
                            for_each_chunk_mut(&mut out, 1, |i, c| {
                                counter.fetch_add(1, Ordering::Relaxed);
                                c[0] += (i as u64) * 3 + 1;
                            });
                            assert_eq!(counter.load(Ordering::Relaxed), n);
                            out
                        })
                        .collect()
                };
                (with_team(run), run())
            });
            for (n, (a, b)) in sizes.iter().zip(team.iter().zip(&alone)) {
                assert_eq!(a, &expect(*n), "team, {threads} threads, {n} jobs");
                assert_eq!(b, &expect(*n), "rayon, {threads} threads, {n} jobs");
            }
        }
    }

    /// The helpers really take jobs: with jobs that wait for each other, a team of two
    /// finishes only if two threads run them at once.
    #[test]
    fn helpers_take_jobs() {
        let p = pool(MIN_TEAM);
        let threads_seen = p.install(|| {
            with_team(|| {
                let ids = Mutex::new(std::collections::HashSet::new());
                let arrived = AtomicUsize::new(0);
                for_each(2, |_| {
                    assert!(matches!(ROLE.with(Cell::get), Role::Helping), "a team's job");
                    ids.lock().expect("lock").insert(std::thread::current().id());
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let start = std::time::Instant::now();
                    while arrived.load(Ordering::SeqCst) < 2 && start.elapsed().as_secs() < 10 {
                        std::hint::spin_loop();
                    }
                });
                let n = ids.lock().expect("lock").len();
                n
            })
        });
        assert_eq!(threads_seen, 2);
    }

    /// A pool smaller than `MIN_TEAM` runs the pass through rayon.
    #[test]
    fn small_pools_do_not_form_a_team() {
        let p = pool(MIN_TEAM - 1);
        let roles = p.install(|| with_team(|| map(8, |_| matches!(ROLE.with(Cell::get), Role::Alone))));
        assert!(roles.iter().all(|&alone| alone));
    }

    /// `map` keeps order; nested sections inside a job run (serially) without deadlock.
    #[test]
    fn map_in_order_and_nested_sections() {
        let p = pool(MIN_TEAM + 1);
        let got = p.install(|| with_team(|| map(50, |i| map(7, |j| i * 10 + j).iter().sum::<usize>())));
        let want: Vec<usize> = (0..50).map(|i| (0..7).map(|j| i * 10 + j).sum()).collect();
        assert_eq!(got, want);
    }

    /// A panicking job reaches the leader after the section ends, and the team stops.
    #[test]
    fn a_job_panic_reaches_the_leader() {
        let p = pool(MIN_TEAM);
        let r = p.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                with_team(|| {
                    for_each(100, |i| {
                        if i == 57 {
                            panic!("job 57");
                        }
                    })
                })
            }))
        });
        assert!(r.is_err());
        // The pool is usable afterwards (the helper left its loop).
        assert_eq!(p.install(|| with_team(|| map(10, |i| i).len())), 10);
    }

    #[test]
    #[should_panic(expected = "taken twice")]
    fn a_chunk_is_taken_once() {
        let mut v = vec![0u8; 10];
        let c = DisjointChunks::new(&mut v, 3);
        assert_eq!(c.len(), 4);
        let _a = c.take(1);
        let _b = c.take(1);
    }
}
