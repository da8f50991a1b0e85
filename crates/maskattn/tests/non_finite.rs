//! NaN and ±∞ that the mask lets through: they must show up in exactly the outputs and
//! gradients that IEEE arithmetic restricted to the allowed pairs carries them to (the f64
//! reference is that definition), never as a finite number or an "empty row"; everything
//! they do not reach stays as it was, bit for bit (f32 storage) or within the accuracy rule
//! (bf16, whose products pair neighbouring keys and rows).
//!
//! One test function, because it runs every instruction set and the choice is process-wide:
//! clean and poisoned runs of one comparison must run on the same set.

mod common;

use common::{random_case, Case, Layout};
use maskattn::half::bf16;
use maskattn::{reference, set_isa, Dropout, Isa, Mask, MaskShape, Params};

/// Where a poison value goes: `(tensor, b, head, position, feature)`.
#[derive(Clone, Copy, Debug)]
enum Spot {
    K(usize, usize, usize, usize),
    V(usize, usize, usize, usize),
    Q(usize, usize, usize, usize),
    Dout(usize, usize, usize, usize),
}

fn index(layout: Layout, heads: usize, len: usize, d: usize, at: [usize; 4]) -> usize {
    let [b, h, l, x] = at;
    match layout {
        Layout::Bhld => ((b * heads + h) * len + l) * d + x,
        Layout::Blhd => ((b * len + l) * heads + h) * d + x,
    }
}

fn poisoned(c: &Case, spot: Spot, bad: f32) -> Case {
    let mut c = c.clone();
    let [_, hq, hkv, lq, lk, d] = c.dims;
    match spot {
        Spot::K(b, h, j, x) => c.k[index(c.layouts[1], hkv, lk, d, [b, h, j, x])] = bad,
        Spot::V(b, h, j, x) => c.v[index(c.layouts[2], hkv, lk, d, [b, h, j, x])] = bad,
        Spot::Q(b, h, i, x) => c.q[index(c.layouts[0], hq, lq, d, [b, h, i, x])] = bad,
        Spot::Dout(b, h, i, x) => c.dout[((b * hq + h) * lq + i) * d + x] = bad,
    }
    c
}

/// The f64 reference (golden) and the f32 one (naive): out, lse, dq, dk, dv.
fn reference_of(c: &Case) -> ([Vec<f64>; 5], [Vec<f32>; 5]) {
    let (q, k, v) = c.views();
    let p = c.params();
    let dout = c.dout_view();
    let gf = reference::forward::<f64>(&q, &k, &v, &c.mask, &p).unwrap();
    let gb = reference::backward::<f64>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
    let nf = reference::forward::<f32>(&q, &k, &v, &c.mask, &p).unwrap();
    let nb = reference::backward::<f32>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
    (
        [gf.out, gf.lse, gb.dq, gb.dk, gb.dv],
        [nf.out, nf.lse, nb.dq, nb.dk, nb.dv],
    )
}

const NAMES: [&str; 5] = ["out", "lse", "dq", "dk", "dv"];

/// Kernel results of the poisoned case against the reference's, entry by entry: NaN
/// exactly where the reference has NaN, the same infinity where it has one; where the
/// reference did not change, the clean kernel result to the bit (`bitwise`) or within the
/// accuracy rule; elsewhere within the accuracy rule. Returns the number of NaN entries.
fn compare(
    what: &str,
    (kernel, clean_kernel): (&[Vec<f32>; 5], &[Vec<f32>; 5]),
    (gold, clean_gold): (&[Vec<f64>; 5], &[Vec<f64>; 5]),
    naive: &[Vec<f32>; 5],
    eps: f64,
    bitwise: bool,
) -> usize {
    let mut nans = 0;
    for a in 0..5 {
        let (k, g, n) = (&kernel[a], &gold[a], &naive[a]);
        let naive_err = g
            .iter()
            .zip(n)
            .filter(|(g, n)| g.is_finite() && n.is_finite())
            .fold(0f64, |e, (&g, &n)| e.max((n as f64 - g).abs()));
        let bound = 2.0 * naive_err + eps;
        for idx in 0..g.len() {
            let at = || {
                format!(
                    "{what}: {}[{idx}] kernel {} golden {}",
                    NAMES[a], k[idx], g[idx]
                )
            };
            if g[idx].is_nan() {
                nans += 1;
                assert!(k[idx].is_nan(), "{} should be NaN", at());
            } else if g[idx].is_infinite() {
                assert_eq!(k[idx], g[idx] as f32, "{}", at());
            } else if bitwise && g[idx].to_bits() == clean_gold[a][idx].to_bits() {
                assert_eq!(
                    k[idx].to_bits(),
                    clean_kernel[a][idx].to_bits(),
                    "{} changed although nothing reaches it",
                    at()
                );
            } else {
                assert!(k[idx].is_finite(), "{} should be finite", at());
                let e = (k[idx] as f64 - g[idx]).abs();
                assert!(e <= bound, "{} error {e:e} over bound {bound:e}", at());
            }
        }
    }
    nans
}

/// The rule spelled out for a NaN in key `j` of kv head `hk`, batch row `b`: the rows of
/// the kv head's query heads that may see key `j` have NaN output and LSE; no other row does.
fn assert_nan_rows_of_key(c: &Case, res: &[Vec<f32>; 5], b: usize, hk: usize, j: usize) {
    let [bs, hq, hkv, lq, lk, d] = c.dims;
    let s = MaskShape::new(bs, hq, lq, lk);
    let group = hq / hkv;
    let mut seen = 0;
    for bi in 0..bs {
        for h in 0..hq {
            for i in 0..lq {
                let row = (bi * hq + h) * lq + i;
                let sees = bi == b && h / group == hk && c.mask.allowed(&s, bi, h, i, j);
                seen += sees as usize;
                assert_eq!(
                    res[1][row].is_nan(),
                    sees,
                    "lse of row {row} ({bi}, {h}, {i})"
                );
                let out = &res[0][row * d..(row + 1) * d];
                assert_eq!(out.iter().all(|x| x.is_nan()), sees, "out of row {row}");
                assert_eq!(out.iter().any(|x| x.is_nan()), sees, "out of row {row}");
            }
        }
    }
    assert!(seen > 0, "the poisoned key must be visible to some row");
}

/// Runs one case clean and with `bad` at each spot, on the current instruction set.
/// `spots` pairs each place with whether the mask lets a NaN there reach any result (a query
/// or dO row that sees nothing is an empty row, whatever it holds).
fn run_case(label: &str, c: &Case, spots: &[(Spot, bool)], half: bool) {
    let run = |c: &Case| {
        if half {
            c.run_kernel_half::<bf16>()
        } else {
            c.run_kernel()
        }
    };
    let c = if half { c.rounded::<bf16>() } else { c.clone() };
    let clean = run(&c);
    let (clean_gold, _) = reference_of(&c);
    let eps = if half {
        common::ulp_at_scale::<bf16>(&clean_gold[0]).max(1e-5)
    } else {
        1e-5
    };
    for &(spot, reaches) in spots {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let p = poisoned(&c, spot, bad);
            let res = run(&p);
            let (gold, naive) = reference_of(&p);
            let what = format!("{label}: {bad} at {spot:?}");
            // bf16 gradients: the reference computed in bf16 is the naive side (see
            // `Case::check_half`); the f32 one bounds the forward. A scale-wide ulp covers both.
            let eps = if half {
                eps.max(common::ulp_at_scale::<bf16>(&gold[2]) * 4.0)
            } else {
                eps
            };
            let nans = compare(
                &what,
                (&res, &clean),
                (&gold, &clean_gold),
                &naive,
                eps,
                !half,
            );
            if bad.is_nan() {
                assert_eq!(nans > 0, reaches, "{what}: {nans} NaN results");
            }
            match (spot, bad.is_nan()) {
                (Spot::K(b, hk, j, _), true) if reaches => {
                    assert_nan_rows_of_key(&p, &res, b, hk, j)
                }
                (Spot::Dout(b, h, i, _), _) => {
                    // dV of keys that row (b, h, i) may not see takes nothing from its dO.
                    let [bs, hq, hkv, lq, lk, d] = p.dims;
                    let s = MaskShape::new(bs, hq, lq, lk);
                    let hk = h / (hq / hkv);
                    for j in (0..lk).filter(|&j| !p.mask.allowed(&s, b, h, i, j)) {
                        let at = ((b * hkv + hk) * lk + j) * d;
                        assert!(
                            res[4][at..at + d].iter().all(|x| x.is_finite()),
                            "{what}: dv of key {j}, which the row does not see"
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

fn case(dims: [usize; 6], mask: Mask, dropout: Option<Dropout>) -> Case {
    let mut c = random_case(11, dims, (16, 16), false);
    c.mask = mask;
    c.scale = None;
    c.dropout = dropout;
    c
}

#[test]
fn non_finite_values_the_mask_lets_through_reach_exactly_what_ieee_says() {
    // Causal bottom-right with L_q > L_k: queries 0..8 see nothing (empty rows), key j is
    // seen from query j + 8 on; batch row 1 has 20 valid keys. GQA: 4 query heads, 2 kv heads.
    let mask = || Mask::causal() & Mask::key_padding(vec![29, 20]);
    let tiled = case([2, 4, 2, 37, 29, 24], mask(), None);
    let dropped = case(
        [2, 4, 2, 37, 29, 24],
        mask(),
        Some(Dropout::new(0.25, 5).unwrap()),
    );
    let spots = [
        (Spot::K(0, 1, 5, 3), true),
        (Spot::V(0, 1, 5, 3), true),
        (Spot::Q(1, 2, 20, 3), true),
        (Spot::Q(1, 2, 2, 3), false), // query 2 sees nothing
        (Spot::Dout(0, 1, 30, 3), true),
        (Spot::Dout(0, 1, 2, 3), false),
        (Spot::Dout(1, 3, 36, 0), true),
        (Spot::K(1, 0, 25, 3), false), // key 25 of batch row 1 is padding
    ];
    // A full mask: every tile is full, so the f32 forward takes the column form of the
    // softmax (`Online::update_cols`, lanes over query rows) on every one of them.
    let full = case([2, 4, 2, 37, 29, 24], Mask::full(), None);
    let full_dropped = case(
        [2, 4, 2, 37, 29, 24],
        Mask::full(),
        Some(Dropout::new(0.25, 5).unwrap()),
    );
    let full_spots = [
        (Spot::K(0, 1, 5, 3), true),
        (Spot::V(0, 1, 28, 3), true),
        (Spot::Q(1, 2, 20, 3), true),
        (Spot::Q(0, 0, 36, 0), true),
        (Spot::Dout(0, 1, 30, 3), true),
    ];
    // Decode path (at most 4 queries): d = 16 reads an f32 cache in place where a tile is full.
    let decode = case(
        [2, 4, 2, 3, 40, 16],
        Mask::causal() & Mask::key_padding(vec![40, 23]),
        None,
    );
    let decode_spots = [
        (Spot::K(0, 1, 30, 3), true),
        (Spot::V(0, 1, 38, 3), true), // seen by queries 1 and 2 only
        (Spot::V(1, 0, 3, 15), true),
        (Spot::Q(1, 2, 1, 3), true),
        (Spot::Dout(0, 1, 0, 3), true),
        (Spot::V(1, 1, 30, 0), false), // padding
    ];
    for isa in Isa::ALL {
        if set_isa(Some(isa)).is_err() {
            common::report(&format!("non_finite: SKIPPED {isa:?} (this CPU lacks it)"));
            continue;
        }
        common::report(&format!("non_finite: ran {}", maskattn::kernel_path()));
        run_case(&format!("{isa:?} tiled"), &tiled, &spots, false);
        run_case(&format!("{isa:?} tiled, dropout"), &dropped, &spots, false);
        run_case(
            &format!("{isa:?} full (column form)"),
            &full,
            &full_spots,
            false,
        );
        run_case(
            &format!("{isa:?} full (column form), dropout"),
            &full_dropped,
            &full_spots,
            false,
        );
        run_case(&format!("{isa:?} decode"), &decode, &decode_spots, false);
        run_case(&format!("{isa:?} tiled bf16"), &tiled, &spots, true);
        run_case(
            &format!("{isa:?} decode bf16"),
            &decode,
            &decode_spots,
            true,
        );
    }
    set_isa(None).unwrap();
}

/// The f64 reference itself follows the rule: a row whose allowed scores are all NaN is NaN,
/// not an empty row (the maximum taken with `f64::max` would skip the NaN).
#[test]
fn reference_row_of_nan_scores_is_nan() {
    let (q, k, v) = (vec![f32::NAN; 4], vec![1.0f32; 8], vec![1.0f32; 8]);
    let qv = maskattn::View::bhld("q", &q, [1, 1, 1, 4]).unwrap();
    let kv = maskattn::View::bhld("k", &k, [1, 1, 2, 4]).unwrap();
    let vv = maskattn::View::bhld("v", &v, [1, 1, 2, 4]).unwrap();
    let r = reference::forward::<f64>(&qv, &kv, &vv, &Mask::full(), &Params::default()).unwrap();
    assert!(r.lse[0].is_nan(), "lse {}", r.lse[0]);
    assert!(r.out.iter().all(|x| x.is_nan()));
}
