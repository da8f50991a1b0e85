//! The bf16 products on AMX tiles (`tdpbf16ps`), written once over a [`tile::TileUnit`]:
//! [`model::Model`] runs the instructions' semantics in plain Rust (every x86-64 CPU: the
//! tests), [`hardware::Hardware`] runs them (CPUs with AMX-TILE and AMX-BF16, after the OS
//! has granted the tile state).
//!
//! The operands are the [`Pairs`](super::bf16::Pairs) of the AVX512-BF16 path, whose
//! layouts already are the tiles' (see [`kernel`]), and the softmax between the products
//! stays the f32 one: a call takes one [`Engine`] (picked once, [`DotPath::now`]) for all
//! its bf16 products, so a CPU without AMX pays one branch per product, no more.

mod mode;
#[cfg(target_arch = "x86_64")]
pub(crate) use mode::MODEL_COLUMN_TILES;
pub use mode::{
    amx_mode, amx_model_column_tiles, amx_model_configures, amx_model_products, amx_tdpbf16ps_loop,
    set_amx, AmxMode,
};

#[cfg(target_arch = "x86_64")]
pub(crate) mod hardware;
#[cfg(target_arch = "x86_64")]
pub(crate) mod kernel;
#[cfg(target_arch = "x86_64")]
pub(crate) mod model;
#[cfg(target_arch = "x86_64")]
pub(crate) mod peak;
#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tile;

#[cfg(target_arch = "x86_64")]
pub(crate) use engine::{DotPath, Engine, TaskTiles};

#[cfg(target_arch = "x86_64")]
mod engine {
    use super::super::bf16::{self, Pairs};
    use super::super::pair_layouts::Packing;
    use super::super::{MatMut, Update};
    use super::{hardware::Hardware, kernel, kernel::Configured, model::Model, AmxMode};

    /// A call's bf16 dot-product path, decided once per call ([`DotPath::now`]): which
    /// code runs the pair products, and which rounds their operands out of f32 tiles.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct DotPath {
        pub engine: Engine,
        pub packing: Packing,
    }

    impl DotPath {
        /// The path of a call starting now, `None` where bf16 storage is widened to f32.
        /// The decision is [`crate::simd::bf16_path`]'s (the kernel path's one home, one
        /// read of the mode and the instruction set); here it becomes the code that runs
        /// it: `vdpbf16ps` (`Vnni`), or the AMX tiles' model or hardware, with the operands
        /// packed by AVX512-BF16 or by scalar code.
        pub fn now() -> Option<DotPath> {
            let path = crate::simd::bf16_path()?;
            let engine = match path.amx {
                AmxMode::Off => Engine::Vnni,
                AmxMode::Model => Engine::AmxModel,
                AmxMode::Hardware => Engine::AmxHardware,
            };
            Some(DotPath {
                engine,
                packing: Packing::of(path),
            })
        }
    }

    /// Which code computes a call's bf16 pair products.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Engine {
        /// `vdpbf16ps` on AVX-512 registers (`gemm::bf16`).
        Vnni,
        /// AMX tiles, the plain-Rust model of the instructions.
        AmxModel,
        /// AMX tiles, the instructions.
        AmxHardware,
    }

    impl Engine {
        /// The pair products of one task (on AMX: the tiles configured once for all of
        /// them, released when the value is dropped).
        ///
        /// # Safety
        /// `self` came from [`DotPath::now`] (`Vnni` only where AVX512-BF16 is present,
        /// `AmxHardware` only where `hardware::available()`); the thread runs no other tile
        /// code while the value lives.
        pub unsafe fn tiles(self) -> TaskTiles {
            // SAFETY: the contract.
            unsafe {
                match self {
                    Engine::Vnni => TaskTiles::Vnni,
                    Engine::AmxModel => TaskTiles::Model(Box::new(Configured::new(Model::new()))),
                    Engine::AmxHardware => TaskTiles::Hardware(Configured::new(Hardware)),
                }
            }
        }

        /// `C = A·B` or `C += A·B` on pairs, as [`bf16::gemm`] defines it.
        ///
        /// # Safety
        /// `self` came from [`DotPath::now`] (`Vnni` only where AVX512-BF16 is present,
        /// `AmxHardware` only where `hardware::available()`).
        #[inline(always)]
        pub unsafe fn gemm(self, c: MatMut, a: Pairs, b: Pairs, update: Update) {
            // SAFETY: the contract; the AMX kernel reads only inside the checked operands.
            unsafe {
                match self {
                    Engine::Vnni => bf16::gemm(c, a, b, update),
                    Engine::AmxModel => {
                        super::mode::MODEL_PRODUCTS.bump();
                        kernel::gemm(&mut Model::new(), c, a, b, update)
                    }
                    Engine::AmxHardware => kernel::gemm(&mut Hardware, c, a, b, update),
                }
            }
        }
    }

    /// [`Engine::tiles`]: a task's pair products, on `vdpbf16ps` or on tiles configured
    /// for the whole task.
    pub(crate) enum TaskTiles {
        Vnni,
        /// Boxed: the model's eight tiles are 8 KiB.
        Model(Box<Configured<Model>>),
        Hardware(Configured<Hardware>),
    }

    impl TaskTiles {
        /// On `vdpbf16ps` (not AMX tiles): there the forward's column form reads `P̃ᵀ`
        /// pair by pair as `P̃`, where tiles need it transposed back to rows.
        pub fn is_vnni(&self) -> bool {
            matches!(self, TaskTiles::Vnni)
        }

        /// On the model of the tiles (for the tests' counters).
        pub fn is_model(&self) -> bool {
            matches!(self, TaskTiles::Model(_))
        }

        /// [`Engine::gemm`] without a configuration of its own on AMX.
        ///
        /// # Safety
        /// `self` was made by [`Engine::tiles`] (whose contract covers the engine).
        #[inline(always)]
        pub unsafe fn gemm(&mut self, c: MatMut, a: Pairs, b: Pairs, update: Update) {
            // SAFETY: the contract; the tiles were configured when `self` was made.
            unsafe {
                match self {
                    TaskTiles::Vnni => bf16::gemm(c, a, b, update),
                    TaskTiles::Model(t) => {
                        super::mode::MODEL_PRODUCTS.bump();
                        t.gemm(c, a, b, update)
                    }
                    TaskTiles::Hardware(t) => t.gemm(c, a, b, update),
                }
            }
        }
    }
}
