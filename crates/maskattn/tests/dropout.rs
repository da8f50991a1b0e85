//! Attention dropout: reproducible from its seed, drops about `p` of the pairs, and forward
//! and backward (tiled and decode paths) agree with the reference that applies the same
//! keep pattern.

mod common;

use common::random_case;
use maskattn::{Dropout, Mask};

#[test]
fn keeps_about_one_minus_p_of_the_pairs() {
    for p in [0.1f32, 0.5, 0.9] {
        let d = Dropout::new(p, 42).unwrap();
        let (heads, lq, lk) = (4, 100, 250);
        let kept = (0..heads)
            .flat_map(|h| (0..lq).flat_map(move |i| (0..lk).map(move |j| (h, i, j))))
            .filter(|&(h, i, j)| d.keep(0, h, i, j, heads, lq))
            .count();
        let frac = kept as f64 / (heads * lq * lk) as f64;
        // 100 000 draws: the standard deviation is below 0.002.
        assert!((frac - (1.0 - p as f64)).abs() < 0.01, "p {p}: kept {frac}");
    }
    assert!(Dropout::new(0.0, 1).unwrap().keep(0, 0, 0, 0, 1, 1));
}

#[test]
fn same_seed_same_result_other_seed_other_result() {
    let mut c = random_case(3, [1, 2, 2, 40, 70, 16], (16, 32), false);
    c.mask = Mask::causal();
    c.dropout = Some(Dropout::new(0.3, 7).unwrap());
    let a = c.run_kernel();
    let b = c.run_kernel();
    assert_eq!(a[0], b[0]);
    assert_eq!(a[2], b[2]);
    c.dropout = Some(Dropout::new(0.3, 8).unwrap());
    let other = c.run_kernel();
    assert_ne!(a[0], other[0]);
    // LSE is that of the undropped weights: the same whatever the seed, and without dropout.
    assert_eq!(a[1], other[1]);
    c.dropout = None;
    assert_eq!(a[1], c.run_kernel()[1]);
}

#[test]
fn kernels_with_dropout_match_the_reference() {
    let shapes: &[[usize; 6]] = &[
        [2, 4, 2, 113, 203, 59], // tiled forward
        [1, 8, 2, 1, 300, 64],   // decode path
        [1, 3, 3, 3, 77, 16],    // decode path, several queries
        [2, 2, 1, 64, 64, 32],
    ];
    for (n, &dims) in shapes.iter().enumerate() {
        for (s, p) in [0.1f32, 0.5, 0.8].into_iter().enumerate() {
            let mut c = random_case(900 + 10 * n as u64 + s as u64, dims, (64, 64), s == 1);
            c.dropout = Some(Dropout::new(p, 1234 + s as u64).unwrap());
            c.check();
        }
    }
}
