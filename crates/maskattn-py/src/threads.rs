//! The thread pool the kernels run on: rayon's global pool (all cores) unless
//! `maskattn.set_num_threads(n)` installed a pool of its own.

use std::sync::{Arc, RwLock};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::ThreadPool;

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

/// Runs `f` on the chosen pool.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = POOL.read().map(|p| p.clone()).unwrap_or(None);
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// `n` threads for every later kernel call; 0 goes back to rayon's global pool.
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    let pool = if n == 0 {
        None
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Some(Arc::new(pool))
    };
    *POOL
        .write()
        .map_err(|_| PyValueError::new_err("thread pool lock poisoned"))? = pool;
    Ok(())
}

/// Threads the kernels run on now.
#[pyfunction]
pub fn get_num_threads() -> usize {
    let pool = POOL.read().map(|p| p.clone()).unwrap_or(None);
    pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
}
