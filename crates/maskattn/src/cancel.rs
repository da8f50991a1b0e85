//! Stopping a long call from another thread: a flag the kernels look at between tiles.
//!
//! Why: a forward or backward at a long sequence runs for seconds to minutes inside one
//! Rust call, and a caller (the Python package on Ctrl-C, a server dropping a request) has
//! no other way to get its threads back. The flag is read with a relaxed load once per tile,
//! which costs nothing beside a tile's products.

use std::sync::atomic::{AtomicBool, Ordering};

/// A cancellation flag: give it to a call with [`Params::with_cancel`](crate::Params::with_cancel),
/// set it from any thread with [`Cancel::cancel`]; the call then skips its remaining tiles
/// and returns [`AttnError::Cancelled`](crate::AttnError::Cancelled). Outputs of a cancelled
/// call are unspecified.
#[derive(Debug, Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every call holding this flag to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
