//! `maskattn::merge_partials`, the merge of partial results over disjoint key sets
//! (docs/design.md section 1, "Blocks of a larger problem"), at its edges: −∞, NaN, +∞, bad
//! lengths. That a merge of key blocks equals the forward over all keys is in
//! tests/global_blocks.rs.

mod common;

use common::Rng;
use maskattn::AttnError;

/// `(O_a, LSE_a) ⊕ (O_b, LSE_b)` at the edges: a side with LSE −∞ leaves the other bit for
/// bit (whatever its O holds), rows empty on both sides are `O = 0`, `LSE = −∞`, NaN or +∞ in
/// an LSE makes the row NaN, and the order of the two sides does not matter beyond rounding.
#[test]
fn merge_partials_at_infinity_and_nan() {
    let d = 3;
    let ninf = f32::NEG_INFINITY;
    let a_out = vec![
        1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 7.0, 8.0, 9.0, 1.0, 1.0, 1.0,
    ];
    let a_lse = vec![0.5, -3.0, ninf, 2.0, 1.0];
    let b_out = vec![
        f32::NAN,
        9.0,
        9.0,
        1.0,
        2.0,
        3.0,
        0.0,
        0.0,
        0.0,
        3.0,
        2.0,
        1.0,
        2.0,
        2.0,
        2.0,
    ];
    let b_lse = vec![ninf, ninf, ninf, 2.0, f32::NAN];
    let (mut out, mut lse) = (a_out.clone(), a_lse.clone());
    maskattn::merge_partials(&mut out, &mut lse, &b_out, &b_lse, d).unwrap();
    // Rows 0, 1: b saw nothing (its O, even NaN, is not read): a, bit for bit.
    assert_eq!(&out[..6], &a_out[..6]);
    assert_eq!(&lse[..2], &a_lse[..2]);
    // Row 2: empty on both sides.
    assert_eq!((&out[6..9], lse[2]), (&[0.0f32; 3][..], ninf));
    // Row 3: equal LSEs: the mean, and LSE + ln 2.
    assert_eq!(&out[9..12], &[5.0, 5.0, 5.0]);
    assert!((lse[3] - (2.0 + 2f32.ln())).abs() < 1e-6);
    // Row 4: a NaN LSE makes the row NaN.
    assert!(lse[4].is_nan() && out[12..].iter().all(|x| x.is_nan()));
    // The other way round: empty a takes b exactly; +∞ is NaN too.
    let (mut out, mut lse) = (vec![7.0; 6], vec![ninf, f32::INFINITY]);
    maskattn::merge_partials(
        &mut out,
        &mut lse,
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        &[0.25, 0.0],
        d,
    )
    .unwrap();
    assert_eq!((&out[..3], lse[0]), (&[1.0f32, 2.0, 3.0][..], 0.25));
    assert!(lse[1].is_nan() && out[3..].iter().all(|x| x.is_nan()));
    // Commutative up to rounding.
    let mut rng = Rng::new(5);
    let (xo, xl, yo, yl) = (rng.vec(40 * 8), rng.vec(40), rng.vec(40 * 8), rng.vec(40));
    let (mut o1, mut l1, mut o2, mut l2) = (xo.clone(), xl.clone(), yo.clone(), yl.clone());
    maskattn::merge_partials(&mut o1, &mut l1, &yo, &yl, 8).unwrap();
    maskattn::merge_partials(&mut o2, &mut l2, &xo, &xl, 8).unwrap();
    let gap = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    assert!(gap(&o1, &o2) < 1e-6 && gap(&l1, &l2) < 1e-6);
}

/// Buffers of the wrong length, or `d = 0`, are typed errors naming the argument.
#[test]
fn bad_partials_are_typed_errors() {
    let (mut out, mut lse) = (vec![0f32; 12], vec![0f32; 4]);
    let e = maskattn::merge_partials(&mut out, &mut lse, &[0.0; 11], &[0.0; 4], 3).unwrap_err();
    assert!(e.to_string().contains("part_out"), "{e}");
    let e = maskattn::merge_partials(&mut out, &mut lse, &[0.0; 12], &[0.0; 3], 3).unwrap_err();
    assert!(e.to_string().contains("part_lse"), "{e}");
    let e = maskattn::merge_partials(&mut out, &mut lse, &[0.0; 12], &[0.0; 4], 0).unwrap_err();
    assert!(matches!(e, AttnError::ZeroDim { .. }), "{e}");
}
