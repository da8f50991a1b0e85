//! The f32 products on AVX2's own register tile (6 rows × 2 ymm vectors, `simd/avx2.rs`)
//! against the f64 reference, forward and backward, in a process of its own because the
//! instruction set is process-wide. Tile sizes are chosen so that every block size the walk
//! hands out (6, 5, 4, 3, 2 and 1 rows; 2 vectors) occurs in every product: the column
//! form's `Kᵀ·Q`, the row form's `Q·Kᵀ` and `P̃·V` of the forward, and the backward's five.

mod common;

use common::{random_case, report, Case};
use maskattn::{set_isa, Isa, Mask};

#[test]
fn avx2_register_tiles_follow_the_accuracy_rule() {
    if !Isa::available().contains(&Isa::Avx2) {
        report("avx2_register_tiles: SKIPPED Avx2 (this CPU lacks it)");
        return;
    }
    set_isa(Some(Isa::Avx2)).unwrap();
    let path = maskattn::kernel_path();
    report(&format!("avx2_register_tiles: ran {path}"));
    assert_eq!(path.isa, Isa::Avx2);
    assert_eq!(path.f32_tile, (6, 16), "AVX2's own register tile");
    // (tile_q, tile_k): the products' rows are a tile's query rows or its keys, so these
    // (and the last, shorter tiles of each length) leave every remainder modulo 6.
    let tiles = [(64, 64), (61, 59), (17, 23), (6, 12), (29, 64), (64, 40)];
    let mut case_no = 0u64;
    for (t, &tiles) in tiles.iter().enumerate() {
        for (lq, lk, d) in [(130, 125, 64), (67, 131, 128), (45, 50, 33), (64, 64, 7)] {
            for (m, mask) in [Mask::full(), Mask::causal()].into_iter().enumerate() {
                case_no += 1;
                let dims = [1, 2, 1, lq, lk, d];
                let c = Case {
                    mask: mask.clone(),
                    ..random_case(case_no * 7919 + t as u64, dims, tiles, false)
                };
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.check()))
                    .unwrap_or_else(|_| {
                        panic!("AVX2 tiles: {dims:?} tiles {tiles:?} mask #{m} ({mask:?})")
                    });
            }
        }
    }
    set_isa(None).unwrap();
}
