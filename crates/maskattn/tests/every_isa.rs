//! Every instruction set this CPU can run (AVX-512, AVX2+FMA, portable) against the f64
//! reference, in a process of its own because the choice is process-wide.

mod common;

use common::{random_case, report, Rng};
use maskattn::{set_isa, Isa};

#[test]
fn every_available_isa_follows_the_accuracy_rule() {
    let isas = Isa::available();
    assert!(isas.contains(&Isa::Portable));
    #[cfg(target_arch = "aarch64")]
    assert_eq!(isas[0], Isa::Neon);
    for isa in Isa::ALL {
        if !isas.contains(&isa) {
            report(&format!("every_isa: SKIPPED {isa:?} (this CPU lacks it)"));
            assert_eq!(
                set_isa(Some(isa)),
                Err(isa),
                "a set the CPU lacks is refused"
            );
            continue;
        }
        set_isa(Some(isa)).unwrap();
        assert_eq!(maskattn::current_isa(), isa);
        report(&format!("every_isa: ran {}", maskattn::kernel_path()));
        let mut rng = Rng::new(77);
        for case in 0..40u64 {
            let hkv = 1 + rng.below(2);
            let dims = [
                1 + rng.below(2),
                hkv * (1 + rng.below(3)),
                hkv,
                1 + rng.below(150),
                1 + rng.below(150),
                [1, 7, 16, 33, 59, 64, 111][rng.below(7)],
            ];
            let tiles = [(64, 64), (16, 32), (7, 13), (32, 100)][rng.below(4)];
            let c = random_case(case * 31 + 5, dims, tiles, case % 3 == 0);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.check())).unwrap_or_else(
                |_| {
                    panic!(
                        "{isa:?}: case {case} {dims:?} tiles {tiles:?} mask {:?}",
                        c.mask
                    )
                },
            );
        }
    }
    set_isa(None).unwrap();
}
