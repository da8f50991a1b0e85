//! The program's global allocator: mimalloc, counting live bytes and their peak so that
//! `bench` can report the memory a kernel call needs beyond its inputs and outputs.
//!
//! Why not the system allocator: candle allocates a fresh buffer for every tensor op, and
//! glibc's malloc hands blocks of megabytes back to the kernel on free and maps new ones on
//! the next call, so a training or embedding step spent much of its time zeroing fresh pages
//! (page faults were ~20% of a profile; plain-candle attention at (4,8,512,64) ran 4× slower).
//! mimalloc keeps freed memory for reuse.

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc as System;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to mimalloc with the caller's own arguments, so `GlobalAlloc`'s
// contract is mimalloc's; the counters beside it allocate nothing and never unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `layout` is the caller's, valid and of non-zero size (`alloc`'s contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (that is, from mimalloc) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc with `layout`; `new_size` is the caller's, non-zero.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now =
                    LIVE.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Bytes allocated now.
pub fn live() -> usize {
    LIVE.load(Relaxed)
}

/// Starts a new peak measurement from the current level.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// Highest level since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// mimalloc's `mi_option_purge_delay` (`enum mi_option_e` in `mimalloc.h`, the same index in
/// the v2 and v3 sources the `mimalloc` crate bundles).
const MI_OPTION_PURGE_DELAY: i32 = 15;

extern "C" {
    fn mi_option_set(option: i32, value: std::ffi::c_long);
}

/// Keeps freed memory mapped instead of handing it back to the kernel 10 ms after a free
/// (mimalloc's default). A training step or a forward+backward call frees its buffers and
/// allocates the same sizes again a few ms later; purged pages come back as page faults and
/// zeroing (a candle attention forward+backward at (4,8,512,64): 45 ms with purging, 34 ms
/// without). The price: the process keeps its peak footprint until it exits.
pub fn keep_freed_memory() {
    // SAFETY: sets a mimalloc option; valid at any time, options are read as needed.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
