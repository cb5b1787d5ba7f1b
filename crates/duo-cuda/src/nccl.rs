//! NCCL, loaded at run time: the one collective tensor parallelism needs (an in-place sum
//! of `f32` buffers over the GPUs of one process), and its communicators.
//!
//! NCCL is found the way the GPU hosts register it (`libnccl.so.2` with the system loader;
//! `$DUO_NCCL_LIB` names another file), only when several GPUs are asked for, so a
//! one-GPU run never needs it. cudarc's NCCL bindings are not used because they look for
//! `libnccl.so` and `libnccl.so.<CUDA major>` only. NVLink multicast (NVLS) stays off in
//! every process duo starts ([`Nccl::load`] sets `NCCL_NVLS_ENABLE=0` before NCCL reads its
//! environment): on shared hosts a program using it can take the GPUs out of service.

#![allow(unsafe_code)] // a C library loaded at run time: each call's contract is stated where it is made

use crate::rendezvous::ID_BYTES;
use crate::{CudaError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

type Comm = *mut c_void;
type InitAll = unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> c_int;
/// `ncclUniqueId` as C declares it (a struct of 128 chars, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawId {
    internal: [c_char; ID_BYTES],
}
type UniqueId = unsafe extern "C" fn(*mut RawId) -> c_int;
type InitRank = unsafe extern "C" fn(*mut Comm, c_int, RawId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type OneComm = unsafe extern "C" fn(Comm) -> c_int;
type NoArgs = unsafe extern "C" fn() -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type Version = unsafe extern "C" fn(*mut c_int) -> c_int;

/// `ncclFloat32`, `ncclSum` and `ncclMin` in NCCL's headers (stable since NCCL 2.0).
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_MIN: c_int = 3;
/// Capturing NCCL calls in CUDA graphs needs NCCL 2.9, `ncclCommFinalize` 2.14.
const MIN_VERSION: i32 = 21_400;

/// The loaded library and the entry points duo calls.
pub struct Nccl {
    _lib: libloading::Library,
    init_all: InitAll,
    unique_id: UniqueId,
    init_rank: InitRank,
    all_reduce: AllReduce,
    finalize: OneComm,
    destroy: OneComm,
    abort: OneComm,
    group_start: NoArgs,
    group_end: NoArgs,
    error_string: ErrorString,
    /// `ncclGetVersion`'s code (e.g. 22803 for 2.28.3).
    pub version: i32,
}

static NCCL: OnceLock<std::result::Result<Arc<Nccl>, String>> = OnceLock::new();

impl Nccl {
    /// The library, loaded once per process.
    pub fn load() -> Result<Arc<Nccl>> {
        NCCL.get_or_init(|| Self::open().map(Arc::new)).clone().map_err(CudaError::Driver)
    }

    fn open() -> std::result::Result<Nccl, String> {
        // Before NCCL's first call reads its environment. `duo` does it first thing in
        // `main`, before any thread exists, so this only matters for other users of the crate.
        keep_nvlink_multicast_off();
        let names: Vec<String> = std::env::var("DUO_NCCL_LIB").ok().into_iter().chain(["libnccl.so.2".into(), "libnccl.so".into()]).collect();
        let mut errors = Vec::new();
        for name in &names {
            // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::bind(lib),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(format!("NCCL could not be loaded (set DUO_NCCL_LIB to libnccl.so.2's path): {}", errors.join("; ")))
    }

    fn bind(lib: libloading::Library) -> std::result::Result<Nccl, String> {
        // SAFETY: the symbols are NCCL's C API with the signatures declared above.
        unsafe {
            let sym = |name: &[u8]| -> std::result::Result<*const c_void, String> {
                lib.get::<*const c_void>(name).map(|s| *s).map_err(|e| format!("NCCL lacks {}: {e}", String::from_utf8_lossy(name)))
            };
            let init_all: InitAll = std::mem::transmute(sym(b"ncclCommInitAll\0")?);
            let unique_id: UniqueId = std::mem::transmute(sym(b"ncclGetUniqueId\0")?);
            let init_rank: InitRank = std::mem::transmute(sym(b"ncclCommInitRank\0")?);
            let all_reduce: AllReduce = std::mem::transmute(sym(b"ncclAllReduce\0")?);
            let finalize: OneComm = std::mem::transmute(sym(b"ncclCommFinalize\0")?);
            let destroy: OneComm = std::mem::transmute(sym(b"ncclCommDestroy\0")?);
            let abort: OneComm = std::mem::transmute(sym(b"ncclCommAbort\0")?);
            let group_start: NoArgs = std::mem::transmute(sym(b"ncclGroupStart\0")?);
            let group_end: NoArgs = std::mem::transmute(sym(b"ncclGroupEnd\0")?);
            let error_string: ErrorString = std::mem::transmute(sym(b"ncclGetErrorString\0")?);
            let get_version: Version = std::mem::transmute(sym(b"ncclGetVersion\0")?);
            let mut version = 0;
            get_version(&mut version);
            if version < MIN_VERSION {
                return Err(format!("NCCL {version} is too old: duo needs 2.14 ({MIN_VERSION}) or later (NCCL calls captured in CUDA graphs, communicators finalised together)"));
            }
            Ok(Nccl { _lib: lib, init_all, unique_id, init_rank, all_reduce, finalize, destroy, abort, group_start, group_end, error_string, version })
        }
    }

    /// A new group's id (rank 0 makes it and hands it to the others, [`crate::rendezvous`]).
    pub fn unique_id(&self) -> Result<[u8; ID_BYTES]> {
        let mut raw = RawId { internal: [0; ID_BYTES] };
        // SAFETY: ncclGetUniqueId writes the 128 bytes of an ncclUniqueId.
        self.check("making an id", unsafe { (self.unique_id)(&mut raw) })?;
        Ok(raw.internal.map(|c| c as u8))
    }

    fn check(&self, what: &str, code: c_int) -> Result<()> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) }.to_string_lossy().into_owned();
        Err(CudaError::Driver(format!("NCCL {what}: {text} ({code})")))
    }
}

/// Sets `NCCL_NVLS_ENABLE=0` unless it is so already: NVLink multicast (NCCL's NVLS) stays
/// off in every process duo starts, since on shared GPU hosts a program that uses it can take
/// the GPUs out of service. Call it while the process has one thread (first in `main`), or at
/// least before NCCL is loaded: changing the environment races with threads that read it.
pub fn keep_nvlink_multicast_off() {
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        // SAFETY: the callers' contract above: no other thread reads the environment now.
        unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
    }
}

/// The communicators of one group of GPUs (one per GPU, made together), torn down together.
struct Comms {
    nccl: Arc<Nccl>,
    comms: Vec<Comm>,
    /// Set once [`Link::abort_all`] has aborted them (their resources are gone).
    aborted: AtomicBool,
    /// Held while an operation runs on every rank: two at once could order their
    /// collectives differently on different ranks and wait for each other forever.
    turn: Mutex<()>,
    /// Told when the group is aborted here (a group spanning processes: the other
    /// processes' alarm, [`crate::rendezvous::Watch::raise`]).
    on_abort: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Comms {
    fn new(nccl: Arc<Nccl>, comms: Vec<Comm>) -> Arc<Self> {
        Arc::new(Comms { nccl, comms, aborted: AtomicBool::new(false), turn: Mutex::new(()), on_abort: Mutex::new(None) })
    }
}

// SAFETY: a communicator may be used from any thread, one call at a time; each rank's is
// used by the thread that runs that rank's share of an operation, under `turn`.
unsafe impl Send for Comms {}
unsafe impl Sync for Comms {}

impl Drop for Comms {
    fn drop(&mut self) {
        // Marked aborted first: an alarm arriving while the communicators finalise (a peer
        // process ending at the same time) then finds nothing to abort.
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        let n = &self.nccl;
        // SAFETY: the communicators were made by ncclCommInitAll and are finalised (as one
        // group, as their shared state needs) and destroyed once, here.
        unsafe {
            (n.group_start)();
            for &c in &self.comms {
                (n.finalize)(c);
            }
            (n.group_end)();
            for &c in &self.comms {
                (n.destroy)(c);
            }
        }
    }
}

/// One GPU's end of a group's communicator.
pub struct Link {
    group: Arc<Comms>,
    /// This GPU's communicator among the group's (those of this process).
    local: usize,
    /// This GPU's rank.
    pub rank: usize,
    /// GPUs in the communicator.
    pub world: usize,
}

impl Link {
    /// One link per device of `ordinals` (rank `i` on device `ordinals[i]`).
    pub fn all(ordinals: &[usize]) -> Result<Vec<Arc<Link>>> {
        let nccl = Nccl::load()?;
        let devices: Vec<c_int> = ordinals.iter().map(|&o| o as c_int).collect();
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device listed.
        nccl.check("initialising", unsafe { (nccl.init_all)(comms.as_mut_ptr(), devices.len() as c_int, devices.as_ptr()) })?;
        let world = devices.len();
        let group = Comms::new(nccl, comms);
        Ok((0..world).map(|rank| Arc::new(Link { group: group.clone(), local: rank, rank, world })).collect())
    }

    /// This process's one rank of a group spanning processes (hosts): `id` from rank 0
    /// ([`crate::rendezvous`]); the current device must be the rank's GPU.
    pub fn one(id: [u8; ID_BYTES], rank: usize, world: usize) -> Result<Arc<Link>> {
        let nccl = Nccl::load()?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives one communicator; the id is one rank 0 made.
        let raw = RawId { internal: id.map(|b| b as c_char) };
        nccl.check("joining the group", unsafe { (nccl.init_rank)(&mut comm, world as c_int, raw, rank as c_int) })?;
        Ok(Arc::new(Link { group: Comms::new(nccl, vec![comm]), local: 0, rank, world }))
    }

    /// Whether every rank of the group is in this process ([`Link::all`]) rather than one
    /// per process ([`Link::one`]).
    pub fn in_one_process(&self) -> bool {
        self.group.comms.len() == self.world
    }

    /// `buf[..n] = sum over ranks of buf[..n]` (`f32`, in place; `buf` a device address on
    /// this rank's GPU), queued on `stream`: every rank must make the same call, in the same
    /// order.
    pub fn all_reduce_sum_f32(&self, buf: u64, n: usize, stream: &cudarc::driver::CudaStream) -> Result<()> {
        self.all_reduce_f32(buf, n, stream, NCCL_SUM)
    }

    /// `values` reduced over the ranks (their sum, or with `min` their smallest) and
    /// returned to the host: every rank makes the same call at the same point. For the few
    /// decisions the ranks must take together (using a captured graph, whether a sequence
    /// fits, the tokens to run), within one process or across several.
    pub fn reduce_on_host(&self, gpu: &crate::Gpu, values: &[f32], min: bool) -> Result<Vec<f32>> {
        let buf = gpu.upload(values)?;
        self.all_reduce_f32(gpu.addr(&buf), values.len(), &gpu.stream, if min { NCCL_MIN } else { NCCL_SUM })?;
        gpu.stream.clone_dtoh(&buf).map_err(|e| CudaError::Driver(e.to_string()))
    }

    /// Whether `yes` holds on every rank: [`Link::reduce_on_host`]'s minimum of one value
    /// (every rank asks at the same point).
    pub fn all_say(&self, gpu: &crate::Gpu, yes: bool) -> Result<bool> {
        Ok(self.reduce_on_host(gpu, &[if yes { 1.0 } else { 0.0 }], true)?[0] >= 1.0)
    }

    fn all_reduce_f32(&self, buf: u64, n: usize, stream: &cudarc::driver::CudaStream, op: c_int) -> Result<()> {
        let stream = stream.cu_stream() as *mut c_void;
        let g = &self.group;
        if g.aborted.load(Ordering::SeqCst) {
            return Err(CudaError::Driver("the GPUs' communicator was aborted after an error on one of them".into()));
        }
        let p = buf as *mut c_void;
        // SAFETY: `buf` holds `n` f32 on this rank's device; NCCL reads and writes it in
        // stream order.
        g.nccl.check("all-reduce", unsafe { (g.nccl.all_reduce)(p, p, n, NCCL_FLOAT32, op, g.comms[self.local], stream) })
    }

    /// Aborts every communicator of the group: after an error on one rank the others may be
    /// waiting in a collective that will never complete; aborting ends those waits (with
    /// errors). The group cannot be used again.
    /// Each communicator is aborted on a thread of its own that nobody waits for: from
    /// NCCL 2.26 an abort returns only once the CUDA graphs holding the communicator's
    /// operations are destroyed, and those live in pools the caller still holds.
    pub fn abort_all(&self) {
        let g = &self.group;
        if g.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(tell) = g.on_abort.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            tell();
        }
        for i in 0..g.comms.len() {
            let group = g.clone();
            std::thread::spawn(move || {
                // SAFETY: each communicator is aborted once (guarded by `aborted`).
                unsafe { (group.nccl.abort)(group.comms[i]) };
            });
        }
    }

    /// `tell` runs when the group is aborted in this process (once): how the ranks of other
    /// processes learn of it.
    pub fn on_abort(&self, tell: impl Fn() + Send + Sync + 'static) {
        *self.group.on_abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(tell));
    }

    /// Whether the group was aborted.
    pub fn aborted(&self) -> bool {
        self.group.aborted.load(Ordering::SeqCst)
    }

    /// Holds the group's turn: one operation on all ranks at a time.
    pub fn turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.group.turn.lock().unwrap_or_else(|p| p.into_inner())
    }
}
