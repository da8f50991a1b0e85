//! The thread pool the kernels (and block-mask compilation) run on: one pool of this
//! module's own, `maskattn.set_num_threads(n)` threads (0: rayon's default, one per core).
//!
//! Never rayon's global pool: a pool's worker threads do not survive `fork`, and a job
//! handed to a pool without workers waits forever. A forked child (a DataLoader worker,
//! `multiprocessing`'s "fork" start method) inherits the parent's pool object but none of
//! its threads, so the pool is tagged with the id of the process that built it and rebuilt
//! on first use in any other process. The global pool could not be rebuilt.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::ThreadPool;

struct Pool {
    /// The process that built the pool (and whose threads it holds).
    pid: u32,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
/// Threads asked for by `set_num_threads` (0: rayon's default).
static WANTED: AtomicUsize = AtomicUsize::new(0);

fn lock() -> MutexGuard<'static, Option<Pool>> {
    // The guarded value is replaced whole, never left half-written: a poisoned lock's
    // value is still sound.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

fn build(n: usize) -> Result<Arc<ThreadPool>, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("maskattn-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| format!("could not start the thread pool: {e}"))
}

/// The pool of this process, built on first use (and again after a fork).
fn pool() -> Result<Arc<ThreadPool>, String> {
    let pid = std::process::id();
    let mut slot = lock();
    if let Some(p) = slot.as_ref() {
        if p.pid == pid {
            return Ok(p.pool.clone());
        }
    }
    // A pool inherited through fork: dropping it would signal worker threads that do not
    // exist in this process (and may wait on locks they held), so it is leaked instead.
    if let Some(stale) = slot.take() {
        std::mem::forget(stale);
    }
    let pool = build(WANTED.load(Ordering::Relaxed))?;
    *slot = Some(Pool {
        pid,
        pool: pool.clone(),
    });
    Ok(pool)
}

/// Runs `f` on this process's pool.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R, String> {
    Ok(pool()?.install(f))
}

/// `n` threads for every later kernel call; 0 goes back to rayon's default (one per core).
/// The Python wrapper bounds `n`.
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    let pool = build(n).map_err(PyValueError::new_err)?;
    let mut slot = lock();
    WANTED.store(n, Ordering::Relaxed);
    let old = slot.replace(Pool {
        pid: std::process::id(),
        pool,
    });
    // As in `pool`: only a pool of this process may be dropped.
    if let Some(old) = old {
        if old.pid != std::process::id() {
            std::mem::forget(old);
        }
    }
    Ok(())
}

/// Threads the kernels run on now.
#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    Ok(pool().map_err(PyValueError::new_err)?.current_num_threads())
}
