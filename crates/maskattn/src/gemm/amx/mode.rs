//! Whether the bf16 products go to AMX tiles, and to which implementation of them.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

/// Where the bf16 products run when the bf16 dot-product path is taken (see
/// [`crate::KernelPath`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxMode {
    /// No AMX: `vdpbf16ps` on AVX-512 registers.
    Off,
    /// The AMX kernel on the plain-Rust model of the tile instructions: exact semantics,
    /// slow; runs on any x86-64 CPU (for tests).
    Model,
    /// The AMX kernel on the CPU's tiles (AMX-TILE and AMX-BF16, granted by the OS).
    Hardware,
}

/// 0 = no override, else 1 + the forced mode's index.
static FORCED: AtomicU8 = AtomicU8::new(0);
static DETECTED: OnceLock<AmxMode> = OnceLock::new();

/// The mode the bf16 products take now: the one [`set_amx`] forced, else `Hardware` where
/// the CPU and OS have AMX and `MASKATTN_AMX` is not `0` (`MASKATTN_AMX=model` picks the
/// model), else `Off`. Decided once per process.
pub fn amx_mode() -> AmxMode {
    match FORCED.load(Ordering::Relaxed) {
        1 => AmxMode::Off,
        2 => AmxMode::Model,
        3 => AmxMode::Hardware,
        _ => *DETECTED.get_or_init(detect),
    }
}

/// Forces a mode (process-wide), or back to the detected one with `None`. `Hardware` is
/// refused where the CPU or OS lacks AMX.
#[doc(hidden)]
pub fn set_amx(mode: Option<AmxMode>) -> Result<(), AmxMode> {
    let code = match mode {
        None => 0,
        Some(AmxMode::Off) => 1,
        Some(AmxMode::Model) if cfg!(target_arch = "x86_64") => 2,
        Some(AmxMode::Hardware) if hardware_available() => 3,
        Some(m) => return Err(m),
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// A count the tests read to see which branch ran (the model is slow anyway).
pub(crate) struct ModelCount(AtomicU64);

impl ModelCount {
    const fn new() -> Self {
        ModelCount(AtomicU64::new(0))
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Products the model has run.
pub(crate) static MODEL_PRODUCTS: ModelCount = ModelCount::new();
/// `ldtilecfg`s the model has run: a forward task configures once for all its products,
/// the backward once per product.
pub(crate) static MODEL_CONFIGURES: ModelCount = ModelCount::new();
/// Key tiles the bf16 forward took in column form with its products on the model (`P̃ᵀ`
/// transposed back to rows for the tiles).
pub(crate) static MODEL_COLUMN_TILES: ModelCount = ModelCount::new();

/// Products the model has run in this process: lets a test see that the bf16 path really
/// went through the AMX kernel.
#[doc(hidden)]
pub fn amx_model_products() -> u64 {
    MODEL_PRODUCTS.get()
}

/// The model's `ldtilecfg`s in this process ([`MODEL_CONFIGURES`]).
#[doc(hidden)]
pub fn amx_model_configures() -> u64 {
    MODEL_CONFIGURES.get()
}

/// Key tiles taken in column form on the model in this process ([`MODEL_COLUMN_TILES`]).
#[doc(hidden)]
pub fn amx_model_column_tiles() -> u64 {
    MODEL_COLUMN_TILES.get()
}

/// `bench`'s AMX limit: `rounds` rounds of four independent `tdpbf16ps` on the CPU's
/// tiles (`rounds · 65536` FLOPs), returning the sum of the results (`rounds / 32` exactly,
/// so that the work is not dead); `None` where the CPU or OS lacks AMX.
#[doc(hidden)]
pub fn amx_tdpbf16ps_loop(rounds: u64) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if hardware_available() {
        // SAFETY: the hardware is available.
        return Some(unsafe {
            super::peak::tdpbf16ps_loop(&mut super::hardware::Hardware, rounds)
        });
    }
    let _ = rounds;
    None
}

fn detect() -> AmxMode {
    match std::env::var("MASKATTN_AMX").as_deref() {
        Ok("0") | Ok("off") => AmxMode::Off,
        Ok("model") if cfg!(target_arch = "x86_64") => AmxMode::Model,
        _ if hardware_available() => AmxMode::Hardware,
        _ => AmxMode::Off,
    }
}

fn hardware_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::hardware::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
