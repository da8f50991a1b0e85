//! The one place where the kernels meet the vector unit, and where the kernel path is
//! chosen: the instruction set ([`current_isa`]) and the bf16 dot products ([`bf16_dot`]).
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
mod ops;
mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::Avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::Neon;
pub(crate) use ops::Simd;
pub(crate) use portable::Portable;

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

/// A call's bf16 dot-product path, as [`bf16_path`] decides it: where the pair products
/// run, and whether AVX512-BF16 rounds their operands out of f32 tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has the path
pub(crate) struct Bf16Path {
    /// `Off`: `vdpbf16ps` on AVX-512 registers (`gemm::bf16`); `Model` or `Hardware`: AMX
    /// tiles (`gemm::amx`).
    pub amx: crate::AmxMode,
    /// [`bf16_instructions`] held: the operands are rounded by `vcvtneps2bf16`, else by
    /// scalar code giving the same bits (`gemm::pair_layouts`).
    pub vector: bool,
}

/// The bf16 dot-product path of a call starting now, `None` where bf16 storage is widened to
/// f32: `vdpbf16ps` where [`bf16_instructions`]; AMX tiles where `amx_mode` says so — their
/// plain-Rust model on every x86-64 CPU (operands packed in scalar code where
/// `bf16_instructions` is false: `MASKATTN_ISA=avx2 MASKATTN_AMX=model` runs it so on a CPU
/// with AVX512-BF16), the hardware only alongside `bf16_instructions`; never with
/// `MASKATTN_BF16_DOT=0`. One read of the mode and of the instruction set, so that a switch
/// meanwhile cannot give a call an engine its CPU lacks.
///
/// The decision lives here, with the instruction set's, and `gemm::amx::DotPath::now` only
/// turns it into the code that runs it: this file reads the AMX mode (`gemm/amx/mode.rs`,
/// which imports nothing from `simd`) and `gemm` imports this file, never the other way
/// round, so the imports form no cycle.
pub(crate) fn bf16_path() -> Option<Bf16Path> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::AmxMode;
        let vector = bf16_instructions();
        let amx = crate::amx_mode();
        let ok = match amx {
            AmxMode::Off | AmxMode::Hardware => vector,
            AmxMode::Model => !bf16_dot_switched_off(),
        };
        ok.then_some(Bf16Path { amx, vector })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether bf16 storage goes to bf16 pair products (AVX512-BF16, or AMX tiles: the
/// hardware, or their model on any x86-64 CPU) instead of being widened to f32: whether
/// [`bf16_path`] finds a path.
pub(crate) fn bf16_dot() -> bool {
    bf16_path().is_some()
}

/// Whether the kernels may use the CPU's bf16 instructions now (`vdpbf16ps`,
/// `vcvtneps2bf16`; see `gemm::bf16`): the CPU has AVX512-BF16 (and BW), the kernels run on
/// AVX-512 (so `set_isa`/`MASKATTN_ISA` forcing a narrower set also turns them off), and
/// `MASKATTN_BF16_DOT=0` has not switched them off (for comparison).
#[cfg(target_arch = "x86_64")]
pub(crate) fn bf16_instructions() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    current_isa() == Isa::Avx512
        && *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
                && !bf16_dot_switched_off()
        })
}

/// `MASKATTN_BF16_DOT=0`: bf16 storage widened to f32 whatever the AMX mode (for
/// comparison); read once.
#[cfg(target_arch = "x86_64")]
fn bf16_dot_switched_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("MASKATTN_BF16_DOT").as_deref() == Ok("0"))
}

/// The kernel code a call takes now: the instruction set of the f32 products, whether
/// bf16 storage goes to the bf16 dot products, whether those run on AMX tiles (the
/// hardware, or the plain-Rust model of it; `Off` when `bf16_dot` is false), and the f32
/// register tile. `Display` names all four, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPath {
    pub isa: Isa,
    pub bf16_dot: bool,
    pub amx: crate::AmxMode,
    /// The f32 products' register tile on `isa`: (rows, lanes) of C held in registers.
    pub f32_tile: (usize, usize),
}

impl Isa {
    /// The f32 products' register tile on this set (`gemm`): rows of C by lanes of C
    /// (`Simd::MR` × `Simd::NV_MAX · W`), so that a test or benchmark names the tile shape
    /// it ran.
    pub fn f32_register_tile(self) -> (usize, usize) {
        fn of<S: Simd>() -> (usize, usize) {
            (S::MR, S::NV_MAX * S::W)
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => of::<Avx512>(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => of::<Avx2>(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => of::<Neon>(),
            _ => of::<Portable>(),
        }
    }
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
        let (rows, lanes) = self.f32_tile;
        write!(
            f,
            "f32 on {:?}; {bf16}; f32 register tiles {rows} × {lanes}",
            self.isa
        )
    }
}

/// The kernel path calls take now (see [`KernelPath`]).
pub fn kernel_path() -> KernelPath {
    let path = bf16_path();
    let isa = current_isa();
    KernelPath {
        isa,
        bf16_dot: path.is_some(),
        amx: path.map_or(crate::AmxMode::Off, |p| p.amx),
        f32_tile: isa.f32_register_tile(),
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
mod every_set;
#[cfg(test)]
mod exp_tests;
#[cfg(test)]
mod tanh_tests;
