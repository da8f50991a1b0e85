//! The thread pool the kernels (and block-mask compilation) run on: one pool of this
//! module's own, `maskattn.set_num_threads(n)` threads (0: rayon's default, one per core).
//!
//! Never rayon's global pool: a pool's worker threads do not survive `fork`, and a job
//! handed to a pool without workers waits forever. A forked child (a DataLoader worker,
//! `multiprocessing`'s "fork" start method) inherits the parent's pool object but none of
//! its threads, so the pool is tagged with the id of the process that built it and rebuilt
//! on first use in any other process. The global pool could not be rebuilt.
//!
//! A small call runs on the calling thread instead: handing a job to a pool worker and
//! waiting for it costs two thread wake-ups (tens of µs, far more on a busy machine), more
//! than the kernels take at a decode step's shapes. Each calling thread gets a one-thread
//! pool of which it is itself the worker (`use_current_thread`), so `install` runs inline and
//! the kernels' parallel loops run sequentially. It has no thread of its own to lose in a
//! fork, and lives as long as the thread (rayon leaks it by design: one per Python thread).

use std::cell::OnceCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use maskattn::Cancel;

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

/// Calls of at most this many multiply-adds (`B·H_q·L_q·L_k·d`, doubled for a backward)
/// run on the calling thread: there the hand-off to the pool costs more than a second
/// thread saves.
pub const INLINE_WORK: usize = 1 << 19;

thread_local! {
    /// This thread's one-thread pool (itself); `None` if rayon refused (the thread is
    /// already a worker of another pool).
    static INLINE: OnceCell<Option<ThreadPool>> = const { OnceCell::new() };
}

/// Runs `f`, a call of about `work` multiply-adds: on the calling thread when it is small
/// (or the pool has one thread), else on the pool.
pub fn run_sized<R: Send>(work: usize, f: impl FnOnce() -> R + Send) -> Result<R, String> {
    if work > INLINE_WORK && WANTED.load(Ordering::Relaxed) != 1 {
        return run(f);
    }
    let mut f = Some(f);
    let inline = INLINE.with(|cell| {
        let pool = cell.get_or_init(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .use_current_thread()
                .build()
                .ok()
        });
        pool.as_ref()
            .map(|p| p.install(f.take().expect("not yet run")))
    });
    match inline {
        Some(r) => Ok(r),
        None => run(f.take().expect("not yet run")),
    }
}

/// Calls of more than this many multiply-adds run on the pool even where it has one thread,
/// so that they can be interrupted ([`run_interruptible`]): milliseconds of work, beside
/// which the hand-off's tens of µs are lost.
pub const INTERRUPTIBLE_WORK: usize = 1 << 27;

/// How often a caller waiting on the pool asks whether it was interrupted.
const POLL: Duration = Duration::from_millis(50);

/// [`run_sized`], but a call that goes to the pool can be interrupted. The calling thread
/// does not lend itself to the pool: it waits for `f` in slices of [`POLL`], asking
/// `interrupted` between them (the kernels ask Python whether a signal handler raised, i.e.
/// Ctrl-C). On `Some(e)` it sets `cancel`, which `f`'s kernels look at between tiles, waits
/// for `f` to end, and returns `Err(e)`; `f`'s own result is dropped.
///
/// Why not `install`: the thread that waits inside `install` cannot run Python's signal
/// handlers, so a long call held Ctrl-C back until it finished.
pub fn run_interruptible<R: Send, E>(
    work: usize,
    cancel: &Cancel,
    f: impl FnOnce() -> R + Send,
    mut interrupted: impl FnMut() -> Option<E>,
) -> Result<Result<R, E>, String> {
    let pooled =
        work > INTERRUPTIBLE_WORK || (work > INLINE_WORK && WANTED.load(Ordering::Relaxed) != 1);
    if !pooled {
        return run_sized(work, f).map(Ok);
    }
    let pool = pool()?;
    let (tx, rx) = mpsc::channel();
    let waited = pool.in_place_scope(|scope| {
        scope.spawn(move |_| {
            // The receiver is gone only if the caller stopped waiting, which it never does.
            let _ = tx.send(f());
        });
        let mut caught = None;
        loop {
            match rx.recv_timeout(POLL) {
                Ok(r) => return Some(caught.map_or(Ok(r), Err)),
                Err(RecvTimeoutError::Timeout) if caught.is_none() => {
                    caught = interrupted();
                    if caught.is_some() {
                        cancel.cancel();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // `f` panicked: the scope re-raises its panic as it ends.
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    });
    waited.ok_or_else(|| "the kernel call panicked".to_string())
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
