//! A memory and time budget for untrusted work: chat templates come from model files, and a
//! template can build a string that doubles at every step (`{% set ns.v = ns.v ~ ns.v %}` in a
//! loop, or a recursive macro) faster than any step or fuel limit notices.
//!
//! [`run`] executes a closure on a fresh thread whose allocations are charged to a budget
//! (bytes allocated minus bytes freed by that thread). When a charge would go over, the
//! allocation is not made: the thread stops there for good (it sleeps, holding what it had,
//! at most the budget) and the caller gets [`BudgetError::Memory`] at once. A closure that
//! outruns the time limit gives [`BudgetError::Time`].
//!
//! The accounting lives in [`BudgetAllocator`], which the binary installs as its global
//! allocator (`duo` does); in a program without it, [`run`] still enforces the time limit.
//! [`keep_step_buffers_mapped`] tunes the system allocator under it for inference.

#![allow(unsafe_code)] // a global allocator is unsafe by nature; it forwards to `System`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

thread_local! {
    /// Bytes this thread may still take; only consulted while `ACTIVE`.
    static REMAINING: Cell<isize> = const { Cell::new(isize::MAX) };
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// Raised when this thread's budget is spent (owned by the thread's closure state).
    static TRIPPED: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Keeps a model step's buffers (up to 64 MiB each) in the heap and up to 64 MiB of freed
/// heap mapped, instead of glibc's defaults (fresh pages from the kernel for every buffer
/// over 128 KiB to 32 MiB, returned as soon as freed): each prefill chunk allocates and frees
/// the same megabytes of activations, and zeroing fresh pages took about 10% of a CPU
/// prefill. Bounded: at most 64 MiB more stays resident than is in use. Elsewhere than
/// glibc it does nothing.
pub fn keep_step_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets glibc allocator parameters; it is called before the
    // program's threads allocate much, and both values are within glibc's accepted range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Why budgeted work did not finish.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// It needed more memory than its budget.
    #[error("it needed more than {0} MiB of memory")]
    Memory(usize),
    /// It ran longer than its time limit.
    #[error("it ran longer than {0:.1} s")]
    Time(f64),
    /// It panicked.
    #[error("it failed unexpectedly")]
    Panicked,
}

/// The global allocator that charges budgeted threads (forwards everything to `System`).
pub struct BudgetAllocator;

/// Charges `bytes` to the current thread's budget; false when that would exceed it.
fn charge(bytes: usize) -> bool {
    // `try_with`: the thread-locals may already be gone while a thread shuts down.
    if !ACTIVE.try_with(Cell::get).unwrap_or(false) {
        return true;
    }
    let left = REMAINING.try_with(Cell::get).unwrap_or(isize::MAX).saturating_sub(bytes as isize);
    if left < 0 {
        return false;
    }
    let _ = REMAINING.try_with(|r| r.set(left));
    true
}

fn refund(bytes: usize) {
    if ACTIVE.try_with(Cell::get).unwrap_or(false) {
        let _ = REMAINING.try_with(|r| r.set(r.get().saturating_add(bytes as isize)));
    }
}

/// The budget is spent: raise the flag and stop this thread for good (no allocation here).
fn spent() -> ! {
    let flag = TRIPPED.try_with(Cell::get).unwrap_or(std::ptr::null());
    if !flag.is_null() {
        // SAFETY: the flag is an `Arc<AtomicBool>` that the budgeted closure's thread keeps
        // alive for its whole life, and this is that thread.
        unsafe { (*flag).store(true, Ordering::SeqCst) };
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments; the accounting
// touches only const-initialised thread-locals without destructors (no allocation, no
// reentry), and an over-budget request never reaches `System`.
unsafe impl GlobalAlloc for BudgetAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !charge(layout.size()) {
            spent();
        }
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !charge(layout.size()) {
            spent();
        }
        // SAFETY: forwarded as given.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            if !charge(new_size - layout.size()) {
                spent();
            }
        } else {
            refund(layout.size() - new_size);
        }
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` on its own thread with `bytes` of memory and `time` to finish.
pub fn run<T: Send + 'static>(bytes: usize, time: Duration, f: impl FnOnce() -> T + Send + 'static) -> Result<T, BudgetError> {
    let tripped = Arc::new(AtomicBool::new(false));
    let flag = tripped.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("duo-budget".into()).spawn(move || {
        TRIPPED.with(|t| t.set(Arc::as_ptr(&flag)));
        REMAINING.with(|r| r.set(bytes.min(isize::MAX as usize) as isize));
        ACTIVE.with(|a| a.set(true));
        let out = f();
        ACTIVE.with(|a| a.set(false));
        let _ = tx.send(out);
        TRIPPED.with(|t| t.set(std::ptr::null()));
        drop(flag);
    });
    if spawned.is_err() {
        return Err(BudgetError::Panicked);
    }
    let started = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(out) => return Ok(out),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(BudgetError::Panicked),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if tripped.load(Ordering::SeqCst) {
                    return Err(BudgetError::Memory(bytes >> 20));
                }
                if started.elapsed() > time {
                    return Err(BudgetError::Time(time.as_secs_f64()));
                }
            }
        }
    }
}
