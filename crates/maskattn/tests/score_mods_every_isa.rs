//! Score modifiers on every instruction set this CPU can run, against the f64 reference
//! (in a process of its own: the choice is process-wide).

mod common;

use common::mods::ModCase;
use common::{report, Rng};
use maskattn::half::bf16;
use maskattn::{set_isa, Isa};

#[test]
fn every_isa_with_every_modifier() {
    let isas = Isa::available();
    for isa in Isa::ALL {
        if !isas.contains(&isa) {
            report(&format!(
                "score_mods_every_isa: SKIPPED {isa:?} (this CPU lacks it)"
            ));
            continue;
        }
        set_isa(Some(isa)).unwrap();
        report(&format!(
            "score_mods_every_isa: ran {}",
            maskattn::kernel_path()
        ));
        let mut rng = Rng::new(21);
        for n in 0..24u64 {
            let hkv = 1 + rng.below(2);
            let lq = if n % 4 == 0 {
                1 + rng.below(4)
            } else {
                1 + rng.below(140)
            };
            let dims = [
                1 + rng.below(2),
                hkv * (1 + rng.below(3)),
                hkv,
                lq,
                1 + rng.below(160),
                [7, 16, 33, 64][rng.below(4)],
            ];
            let tiles = [(64, 64), (16, 32), (7, 13)][rng.below(3)];
            let c = ModCase::random(n * 29 + 3, dims, tiles, n % 2 == 1, (n % 15 + 1) as u8);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.check();
                if n % 6 == 0 {
                    c.check_half::<bf16>();
                }
            }))
            .unwrap_or_else(|_| {
                panic!(
                    "{isa:?}: case {n} {dims:?} tiles {tiles:?} {} mask {:?}",
                    c.mods.names(),
                    c.case.mask
                )
            });
        }
    }
    set_isa(None).unwrap();
}
