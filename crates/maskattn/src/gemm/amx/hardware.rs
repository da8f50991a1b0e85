//! The tile instructions themselves, in `asm!` (which needs no target feature, so this is
//! compiled on every x86-64 target), reached only where [`available`] found AMX.
//!
//! Tile registers are not operands Rust's `asm!` can allocate, so each instruction names
//! its tiles literally: the methods match on the tile numbers, and once inlined into the
//! kernel (whose tile numbers are constants) only the one `asm!` block remains.
//! `tdpbf16ps` is written for the kernel's tile plan only (C in `tmm0..tmm3`, A in
//! `tmm4..tmm5`, B in `tmm6..tmm7`, see `kernel`); another triple panics.

use std::arch::asm;
use std::sync::OnceLock;

use super::tile::{TileConfig, TileUnit};

/// The CPU's tiles. A zero-sized handle: the state is the thread's tile registers.
pub(crate) struct Hardware;

/// Whether the tiles can be used in this process: CPUID leaf 7 (EDX bit 24 AMX-TILE, bit 22
/// AMX-BF16), the OS saving the tile state (XCR0 bits 17 XTILECFG and 18 XTILEDATA, read
/// where CPUID.1:ECX bit 27 OSXSAVE says `xgetbv` exists), and on Linux the permission to
/// use it, asked once per process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`:
/// without it the first tile instruction kills the process with SIGILL). Only Linux is
/// asked; elsewhere the answer is no. `MASKATTN_AMX=0` is handled by the caller.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx() && os_saves_tiles() && os_grants_tiles())
}

fn cpu_has_amx() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID exists on every x86-64 CPU; leaf 7 only where the highest leaf reaches it.
    #[allow(unused_unsafe)] // `__cpuid_count` is safe on newer toolchains
    // SAFETY: CPUID is part of x86-64.
    let (max_leaf, edx) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(7, 0).edx) };
    max_leaf >= 7 && edx & (1 << 24) != 0 && edx & (1 << 22) != 0
}

fn os_saves_tiles() -> bool {
    use std::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is part of x86-64.
    let osxsave = unsafe { __cpuid_count(1, 0).ecx } & (1 << 27) != 0;
    if !osxsave {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: OSXSAVE says the OS enabled `xgetbv`; XCR0 (ecx = 0) is always readable then.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
    }
    lo & (0b11 << 17) == 0b11 << 17
}

#[cfg(target_os = "linux")]
fn os_grants_tiles() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: `arch_prctl(ARCH_REQ_XCOMP_PERM, 18)` only asks for a permission; the
    // `syscall` instruction clobbers rcx and r11, and the result comes back in rax.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn os_grants_tiles() -> bool {
    false
}

/// `$go!("n")` with the tile number as a string literal.
macro_rules! tile {
    ($t:expr, $go:ident) => {
        match $t {
            0 => $go!("0"),
            1 => $go!("1"),
            2 => $go!("2"),
            3 => $go!("3"),
            4 => $go!("4"),
            5 => $go!("5"),
            6 => $go!("6"),
            7 => $go!("7"),
            t => panic!("tmm{t} does not exist"),
        }
    };
}

// SAFETY: each method is the one instruction; the memory they touch is the trait's
// contract, and `available()` (the callers' condition) says the CPU and OS have AMX.
unsafe impl TileUnit for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        debug_assert!(cfg.valid());
        // SAFETY: a valid 64-byte configuration (the trait's contract).
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg as *const TileConfig, options(nostack)) }
    }

    #[inline(always)]
    unsafe fn load(&mut self, tile: usize, ptr: *const u8, stride: usize) {
        macro_rules! go {
            ($n:literal) => {
                // SAFETY: the trait's contract: the tile's rows are valid to read.
                unsafe {
                    asm!(concat!("tileloadd tmm", $n, ", [{p} + {s} * 1]"),
                        p = in(reg) ptr, s = in(reg) stride, options(nostack))
                }
            };
        }
        tile!(tile, go)
    }

    #[inline(always)]
    unsafe fn zero(&mut self, tile: usize) {
        macro_rules! go {
            ($n:literal) => {
                // SAFETY: touches the tile only.
                unsafe { asm!(concat!("tilezero tmm", $n), options(nostack)) }
            };
        }
        tile!(tile, go)
    }

    #[inline(always)]
    unsafe fn dpbf16ps(&mut self, c: usize, a: usize, b: usize) {
        macro_rules! go {
            ($c:literal, $a:literal, $b:literal) => {
                // SAFETY: touches the tiles only; their shapes agree (the kernel's plan).
                unsafe {
                    asm!(
                        concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                        options(nostack)
                    )
                }
            };
        }
        match (c, a, b) {
            (0, 4, 6) => go!("0", "4", "6"),
            (0, 4, 7) => go!("0", "4", "7"),
            (0, 5, 6) => go!("0", "5", "6"),
            (0, 5, 7) => go!("0", "5", "7"),
            (1, 4, 6) => go!("1", "4", "6"),
            (1, 4, 7) => go!("1", "4", "7"),
            (1, 5, 6) => go!("1", "5", "6"),
            (1, 5, 7) => go!("1", "5", "7"),
            (2, 4, 6) => go!("2", "4", "6"),
            (2, 4, 7) => go!("2", "4", "7"),
            (2, 5, 6) => go!("2", "5", "6"),
            (2, 5, 7) => go!("2", "5", "7"),
            (3, 4, 6) => go!("3", "4", "6"),
            (3, 4, 7) => go!("3", "4", "7"),
            (3, 5, 6) => go!("3", "5", "6"),
            (3, 5, 7) => go!("3", "5", "7"),
            t => panic!("tdpbf16ps on {t:?}: not in the kernel's tile plan"),
        }
    }

    #[inline(always)]
    unsafe fn store(&mut self, tile: usize, ptr: *mut u8, stride: usize) {
        macro_rules! go {
            ($n:literal) => {
                // SAFETY: the trait's contract: the tile's rows are valid to write.
                unsafe {
                    asm!(concat!("tilestored [{p} + {s} * 1], tmm", $n),
                        p = in(reg) ptr, s = in(reg) stride, options(nostack))
                }
            };
        }
        tile!(tile, go)
    }

    #[inline(always)]
    unsafe fn release(&mut self) {
        // SAFETY: returns the tiles to their initial state; touches nothing else.
        unsafe { asm!("tilerelease", options(nostack)) }
    }
}
