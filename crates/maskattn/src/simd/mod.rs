//! The one place where the kernels meet the vector unit.
//!
//! Kernels are written once, generic over [`Simd`], and instantiated per instruction set
//! inside a `#[target_feature]` function so that every vector op inlines into straight-line
//! machine code. [`Isa::detect`] picks the widest set the CPU has at run time, so one binary
//! is fast on any x86-64; elsewhere (and as the reference path) the portable set is plain
//! arrays that the compiler vectorises for the target (NEON on aarch64).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod exp;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::Neon;
pub(crate) use portable::Portable;

/// Vector operations on `W` lanes of `f32`.
///
/// # Safety
/// Implementations use instructions that exist only when the matching CPU feature is
/// present; callers reach them only through [`Isa::detect`]. Pointer arguments must be
/// valid for `W` elements.
pub(crate) unsafe trait Simd: Copy + 'static {
    const W: usize;
    /// Vectors per row of the matrix-product register tile (what the register file holds).
    const NV_MAX: usize;
    type V: Copy;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a · b + c` on one lane, fused exactly when [`Simd::fma`] is, so that a scalar dot
    /// product can reproduce the micro-kernel's rounding.
    unsafe fn fma1(a: f32, b: f32, c: f32) -> f32;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn reduce_max(v: Self::V) -> f32;
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// `e^x`, within a few ulp; exactly 0 for `x < −87.3` (so `e^−∞ = 0`, and a hidden
    /// score never turns into a tiny non-zero weight); NaN for NaN (a NaN score must reach
    /// the row sum, see `forward`).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// Lane `l` from `a` where bit `l` of `bits` is set, else from `b`.
    unsafe fn select(bits: u32, a: Self::V, b: Self::V) -> Self::V;
    /// `tanh x` (soft-capping): within 2⁻²³ of the exact value and within 3 · 2⁻²⁴ of it
    /// relatively (measured: 7.1e-8 and 1.3e-7; `exp.rs` has the method, `tanh_tests.rs`
    /// checks every set against `f64::tanh`); NaN for NaN, ±1 for ±∞.
    unsafe fn tanh(x: Self::V) -> Self::V;
}

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (16 lanes).
    Avx512,
    /// AVX2 with FMA (8 lanes).
    Avx2,
    /// NEON on aarch64 (4 lanes).
    Neon,
    /// Plain arrays, vectorised by the compiler for the build target.
    Portable,
}

impl Isa {
    /// Every set the kernels are written for, on any CPU (tests list those they skip).
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable];

    /// The widest set this CPU supports; `MASKATTN_ISA=avx2|portable` forces a narrower one
    /// (for testing and comparison).
    pub fn detect() -> Isa {
        let available = Self::available();
        match std::env::var("MASKATTN_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") if available.contains(&Isa::Avx2) => Isa::Avx2,
            _ => available[0],
        }
    }

    /// Every set this CPU can run, widest first (tests compare them).
    #[allow(clippy::vec_init_then_push)] // the pushes depend on the target
    pub fn available() -> Vec<Isa> {
        let mut sets = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                sets.push(Isa::Avx512);
            }
            if avx2 {
                sets.push(Isa::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        sets.push(Isa::Neon);
        sets.push(Isa::Portable);
        sets
    }
}

/// A kernel step written once for every instruction set: [`run`] calls `with_simd::<S>`
/// with `S` the [`Simd`] set of [`current_isa`], from inside a function compiled with that
/// set's target features, so that `with_simd` (which must be `#[inline(always)]`) and every
/// vector op in it inline into one function per set (the `pulp` / `faer` pattern). The
/// step's operands are the implementing value's fields.
pub(crate) trait WithSimd {
    type Output;
    /// # Safety
    /// The CPU has `S`'s features (what [`run`] guarantees), and the step's own contract.
    unsafe fn with_simd<S: Simd>(self) -> Self::Output;
}

/// Runs `op` on the instruction set the kernels use now.
///
/// # Safety
/// `op`'s own contract (its buffers sized as its fields document).
#[inline(always)]
pub(crate) unsafe fn run<Op: WithSimd>(op: Op) -> Op::Output {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn on_avx512<Op: WithSimd>(op: Op) -> Op::Output {
        // SAFETY: this function's features are those `Avx512` needs; `op`'s contract is
        // `run`'s caller's.
        unsafe { op.with_simd::<Avx512>() }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn on_avx2<Op: WithSimd>(op: Op) -> Op::Output {
        // SAFETY: as for `on_avx512`, with the features `Avx2` needs.
        unsafe { op.with_simd::<Avx2>() }
    }
    match current_isa() {
        // SAFETY: `current_isa` only returns a set the CPU supports (`Isa::detect`, and
        // `set_isa` refuses a set `Isa::available` does not list).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { on_avx512(op) },
        // SAFETY: as for AVX-512.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { on_avx2(op) },
        // SAFETY: NEON is part of every aarch64 target: no wrapper with extra features needed.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { op.with_simd::<Neon>() },
        // SAFETY: the portable set needs no CPU feature.
        _ => unsafe { op.with_simd::<Portable>() },
    }
}

/// Whether bf16 storage goes to bf16 pair products (AVX512-BF16, or AMX tiles: the
/// hardware, or their model on any x86-64 CPU) instead of being widened to f32; see
/// `gemm::bf16` and `gemm::amx::DotPath`.
pub(crate) fn bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::gemm::amx::DotPath::now().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernel code a call takes now: the instruction set of the f32 products, whether
/// bf16 storage goes to the bf16 dot products, and whether those run on AMX tiles (the
/// hardware, or the plain-Rust model of it; `Off` when `bf16_dot` is false). `Display`
/// names all three, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPath {
    pub isa: Isa,
    pub bf16_dot: bool,
    pub amx: crate::AmxMode,
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::AmxMode;
        let bf16 = match (self.bf16_dot, self.amx) {
            (false, _) => "bf16 widened to f32",
            (true, AmxMode::Off) => "bf16 on AVX512-BF16 dot products",
            (true, AmxMode::Hardware) => "bf16 on AMX tiles (tdpbf16ps)",
            (true, AmxMode::Model) => "bf16 on AMX tiles run by the plain-Rust model",
        };
        write!(f, "f32 on {:?}; {bf16}", self.isa)
    }
}

/// The kernel path calls take now (see [`KernelPath`]).
pub fn kernel_path() -> KernelPath {
    let bf16_dot = bf16_dot();
    KernelPath {
        isa: current_isa(),
        bf16_dot,
        amx: if bf16_dot {
            crate::amx_mode()
        } else {
            crate::AmxMode::Off
        },
    }
}

/// Whether bf16 storage runs on bf16 pair products now: the CPU's (AVX512-BF16 present, the
/// kernels on AVX-512), or the AMX tiles' plain-Rust model where `MASKATTN_AMX=model` or
/// `set_amx` asks for it (any x86-64 CPU); never with `MASKATTN_BF16_DOT=0`. Otherwise
/// bf16 is widened and computed in f32. Lets a test or a benchmark say which path it
/// measured.
pub fn bf16_dot_available() -> bool {
    bf16_dot()
}

static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
/// 0 = no override, else 1 + the index of the forced set.
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The instruction set the kernels use now: the one forced by [`set_isa`], or else
/// [`Isa::detect`]'s choice (made once).
pub fn current_isa() -> Isa {
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Isa::Avx512,
        2 => Isa::Avx2,
        3 => Isa::Portable,
        4 => Isa::Neon,
        _ => *DETECTED.get_or_init(Isa::detect),
    }
}

/// Forces the kernels onto one instruction set (process-wide), or back to the detected one
/// with `None`. For tests and benchmarks; a set the CPU lacks is refused.
pub fn set_isa(isa: Option<Isa>) -> Result<(), Isa> {
    let code = match isa {
        None => 0,
        Some(i) if !Isa::available().contains(&i) => return Err(i),
        Some(Isa::Avx512) => 1,
        Some(Isa::Avx2) => 2,
        Some(Isa::Portable) => 3,
        Some(Isa::Neon) => 4,
    };
    FORCED.store(code, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tanh_tests;
