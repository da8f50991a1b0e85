//! Rows that see nothing give O = 0, LSE = −∞ and zero gradients, never NaN; and NaN or ±∞
//! stored where the mask hides it changes no output and no gradient, bit for bit.

mod common;

use common::{random_case, tiles, Case, Layout};
use maskattn::{Mask, MaskShape};
use proptest::prelude::*;

fn case_with_mask(dims: [usize; 6], mask: Mask, seed: u64) -> Case {
    let mut c = random_case(seed, dims, (16, 16), false);
    c.mask = mask;
    c
}

#[test]
fn rows_that_see_nothing_are_zero_and_never_nan() {
    // Batch row 1 has no valid key at all; in row 0 the queries 0..3 see nothing because
    // the causal diagonal (top-left) and a window that starts at key 3 exclude everything.
    let dims = [2, 4, 2, 37, 29, 24];
    let mask =
        Mask::key_padding(vec![29, 0]) & (Mask::causal_top_left() & !Mask::key_padding(vec![3]));
    let c = case_with_mask(dims, mask, 7);
    let [out, lse, dq, dk, dv] = c.run_kernel();
    let [b, hq, hkv, lq, lk, d] = dims;
    for x in out.iter().chain(&lse).chain(&dq).chain(&dk).chain(&dv) {
        assert!(!x.is_nan(), "NaN in a result");
    }
    let empty_row = |bi: usize, i: usize| bi == 1 || i < 3;
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..lq {
                let row = (bi * hq + h) * lq + i;
                if empty_row(bi, i) {
                    assert_eq!(lse[row], f32::NEG_INFINITY, "lse of empty row {row}");
                    assert!(out[row * d..(row + 1) * d].iter().all(|&x| x == 0.0));
                    assert!(dq[row * d..(row + 1) * d].iter().all(|&x| x == 0.0));
                } else {
                    assert!(lse[row].is_finite());
                }
            }
        }
    }
    // The whole of batch row 1 gets zero key and value gradients.
    let per_b = hkv * lk * d;
    assert!(dk[per_b..].iter().chain(&dv[per_b..]).all(|&x| x == 0.0));
    // And everything agrees with the reference.
    c.check();
}

/// Additive bias of −∞ on every allowed pair is a row that sees nothing too.
#[test]
fn minus_infinity_bias_empties_a_row() {
    let dims = [1, 1, 1, 4, 6, 8];
    let mut c = random_case(3, dims, (64, 64), false);
    c.mask = Mask::full();
    let mut bias = vec![0f32; 4 * 6];
    bias[6..12].fill(f32::NEG_INFINITY); // query row 1
    c.bias = Some((bias, [1, 1, 4, 6]));
    let [out, lse, dq, ..] = c.run_kernel();
    assert_eq!(lse[1], f32::NEG_INFINITY);
    assert!(out[8..16].iter().chain(&dq[8..16]).all(|&x| x == 0.0));
    assert!(lse.iter().enumerate().all(|(i, x)| i == 1 || x.is_finite()));
}

/// Writes `bad` into every key and value element that no query of the kv head's group may
/// see, according to the mask itself.
fn poison(c: &mut Case, bad: f32) -> usize {
    let [b, hq, hkv, lq, lk, d] = c.dims;
    let s = MaskShape::new(b, hq, lq, lk);
    let group = hq / hkv;
    let mut n = 0;
    for bi in 0..b {
        for hk in 0..hkv {
            for j in 0..lk {
                let seen = (hk * group..(hk + 1) * group)
                    .any(|h| (0..lq).any(|i| c.mask.allowed(&s, bi, h, i, j)));
                if seen {
                    continue;
                }
                n += 1;
                for x in 0..d {
                    // Index in the case's own layout.
                    let idx = |layout: Layout| match layout {
                        Layout::Bhld => ((bi * hkv + hk) * lk + j) * d + x,
                        Layout::Blhd => ((bi * lk + j) * hkv + hk) * d + x,
                    };
                    let (ik, iv) = (idx(c.layouts[1]), idx(c.layouts[2]));
                    c.k[ik] = bad;
                    c.v[iv] = -bad;
                }
            }
        }
    }
    n
}

/// Runs `c` clean and with `bad` in every key and value nobody may see (after padding the
/// keys too, so that something is hidden from everyone: at least the last key of every
/// batch row). Returns how many keys were poisoned and both results as bits.
fn clean_and_poisoned(
    mut c: Case,
    seed: u64,
    bad: f32,
    run: impl Fn(&Case) -> [Vec<f32>; 5],
) -> (usize, Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let [b, _, _, _, lk, _] = c.dims;
    let lens: Vec<usize> = (0..b).map(|x| (seed as usize >> (8 * x)) % lk).collect();
    c.mask = c.mask.clone() & Mask::key_padding(lens);
    let clean = run(&c);
    let n = poison(&mut c, bad);
    (n, bits(&clean), bits(&run(&c)))
}

fn bits(v: &[Vec<f32>; 5]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn hidden_nan_and_inf_change_nothing(
        seed in any::<u64>(),
        b in 1usize..=2,
        hkv in 1usize..=2,
        group in 1usize..=2,
        lq in 1usize..50,
        lk in 1usize..90,
        d in 1usize..40,
        tiles in tiles(),
        bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ) {
        let c = random_case(seed, [b, hkv * group, hkv, lq, lk, d], tiles, seed % 3 == 0);
        let (n, clean, dirty) = clean_and_poisoned(c, seed, bad, Case::run_kernel);
        prop_assert!(n >= b);
        prop_assert_eq!(clean, dirty);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The same for bf16 storage, whose products (AVX512-BF16 where the CPU has it) take
    /// keys and values in pairs: a hidden NaN must not reach its visible neighbour.
    #[test]
    fn hidden_nan_and_inf_change_nothing_in_bf16(
        seed in any::<u64>(),
        b in 1usize..=2,
        hkv in 1usize..=2,
        group in 1usize..=2,
        lq in 1usize..50,
        lk in 1usize..90,
        d in 1usize..40,
        tiles in tiles(),
        bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ) {
        use maskattn::half::bf16;
        common::report_bf16_path("hidden_nan_and_inf_change_nothing_in_bf16");
        let c = random_case(seed, [b, hkv * group, hkv, lq, lk, d], tiles, seed % 3 == 0);
        let (n, clean, dirty) =
            clean_and_poisoned(c.rounded::<bf16>(), seed, bad, Case::run_kernel_half::<bf16>);
        prop_assert!(n >= b);
        prop_assert_eq!(clean, dirty);
    }
}
