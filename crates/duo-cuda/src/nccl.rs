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

use crate::{CudaError, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, OnceLock};

type Comm = *mut c_void;
type InitAll = unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type Destroy = unsafe extern "C" fn(Comm) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type Version = unsafe extern "C" fn(*mut c_int) -> c_int;

/// `ncclFloat32` and `ncclSum` in NCCL's headers (stable since NCCL 2.0).
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// The loaded library and the entry points duo calls.
pub struct Nccl {
    _lib: libloading::Library,
    init_all: InitAll,
    all_reduce: AllReduce,
    destroy: Destroy,
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
        // Before NCCL's first call reads its environment. SAFETY: duo sets no other
        // variable concurrently, and NCCL is not loaded yet, so nothing reads it meanwhile.
        unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
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
            let all_reduce: AllReduce = std::mem::transmute(sym(b"ncclAllReduce\0")?);
            let destroy: Destroy = std::mem::transmute(sym(b"ncclCommDestroy\0")?);
            let error_string: ErrorString = std::mem::transmute(sym(b"ncclGetErrorString\0")?);
            let get_version: Version = std::mem::transmute(sym(b"ncclGetVersion\0")?);
            let mut version = 0;
            get_version(&mut version);
            Ok(Nccl { _lib: lib, init_all, all_reduce, destroy, error_string, version })
        }
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

/// One GPU's end of a communicator over the GPUs of this process.
pub struct Link {
    nccl: Arc<Nccl>,
    comm: Comm,
    /// This GPU's rank.
    pub rank: usize,
    /// GPUs in the communicator.
    pub world: usize,
}

// SAFETY: a communicator may be used from any thread, one call at a time; each rank's
// link is used by the thread that runs that rank's steps.
unsafe impl Send for Link {}
unsafe impl Sync for Link {}

impl Link {
    /// One link per device of `ordinals` (rank `i` on device `ordinals[i]`).
    pub fn all(ordinals: &[usize]) -> Result<Vec<Arc<Link>>> {
        let nccl = Nccl::load()?;
        let devices: Vec<c_int> = ordinals.iter().map(|&o| o as c_int).collect();
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one communicator per device listed.
        nccl.check("initialising", unsafe { (nccl.init_all)(comms.as_mut_ptr(), devices.len() as c_int, devices.as_ptr()) })?;
        let world = devices.len();
        Ok(comms.into_iter().enumerate().map(|(rank, comm)| Arc::new(Link { nccl: nccl.clone(), comm, rank, world })).collect())
    }

    /// `buf[..n] = sum over ranks of buf[..n]` (`f32`, in place), queued on `stream` (a
    /// `CUstream`): every rank must make the same call, in the same order.
    pub fn all_reduce_sum_f32(&self, buf: u64, n: usize, stream: *mut c_void) -> Result<()> {
        let p = buf as *mut c_void;
        // SAFETY: `buf` holds `n` f32 on this rank's device; NCCL reads and writes it in
        // stream order.
        self.nccl.check("all-reduce", unsafe { (self.nccl.all_reduce)(p, p, n, NCCL_FLOAT32, NCCL_SUM, self.comm, stream) })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitAll and is destroyed once.
        unsafe { (self.nccl.destroy)(self.comm) };
    }
}
