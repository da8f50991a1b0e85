//! Views whose features are not contiguous (a `[B, H, d, L]` buffer read as `[B, H, L, d]`,
//! feature stride `L`): every packer's strided fallback (f32 rows and `Kᵀ`/`Qᵀ`, bf16 rows
//! and pairs) must read the same values as the contiguous fast path, so forward and
//! backward give the same bits as on a contiguous copy of the same tensors — f32 and bf16,
//! full masks (the column form) and causal ones (partial tiles in the row form).

mod common;

use maskattn::half::bf16;
use maskattn::{backward, forward, BlockMask, Element, Mask, MaskShape, Params, Qkv, View};

/// `x` (`[B, H, L, d]`, contiguous) rewritten as `[B, H, d, L]`.
fn feature_major<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = x.to_vec();
    for bh in 0..b * h {
        for i in 0..l {
            for c in 0..d {
                out[bh * l * d + c * l + i] = x[bh * l * d + i * d + c];
            }
        }
    }
    out
}

fn strided<'a, T: Element>(
    name: &'static str,
    x: &'a [T],
    [b, h, l, d]: [usize; 4],
) -> View<'a, T> {
    View::strided(name, x, [b, h, l, d], [h * d * l, d * l, 1, l]).unwrap()
}

fn run<T: Element>(
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    dout: &View,
    mask: &Mask,
) -> Vec<Vec<f32>> {
    let [b, h, lq, _] = q.shape();
    let lk = k.shape()[2];
    let block = BlockMask::new(mask, MaskShape::new(b, h, lq, lk)).unwrap();
    let p = Params::default();
    let f = forward(q, k, v, &block, &p).unwrap();
    let o = View::bhld("out", &f.out, q.shape()).unwrap();
    let g = backward(&Qkv::new(q, k, v), &o, &f.lse, dout, &block, &p).unwrap();
    vec![f.out, f.lse, g.dq, g.dk, g.dv]
}

fn check<T: Element>(
    label: &str,
    to: impl Fn(f32) -> T,
    shapes: ([usize; 4], [usize; 4]),
    mask: &Mask,
) {
    let (qs, ks) = shapes;
    let mut rng = common::Rng::new(qs.iter().sum::<usize>() as u64);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    let (q, k, v, g): (Vec<T>, Vec<T>, Vec<T>, Vec<f32>) = (
        rng.vec(n(qs)).into_iter().map(&to).collect(),
        rng.vec(n(ks)).into_iter().map(&to).collect(),
        rng.vec(n(ks)).into_iter().map(&to).collect(),
        rng.vec(n(qs)),
    );
    let dout = View::bhld("dout", &g, qs).unwrap();
    let plain = run(
        &View::bhld("q", &q, qs).unwrap(),
        &View::bhld("k", &k, ks).unwrap(),
        &View::bhld("v", &v, ks).unwrap(),
        &dout,
        mask,
    );
    let (qt, kt, vt) = (
        feature_major(&q, qs),
        feature_major(&k, ks),
        feature_major(&v, ks),
    );
    let other = run(
        &strided("q", &qt, qs),
        &strided("k", &kt, ks),
        &strided("v", &vt, ks),
        &dout,
        mask,
    );
    for (name, (a, b)) in ["out", "lse", "dq", "dk", "dv"]
        .iter()
        .zip(plain.iter().zip(&other))
    {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{label} {name}: a feature-strided view changed the result"
        );
    }
}

#[test]
fn feature_strided_views_give_the_contiguous_bits() {
    common::report(&format!(
        "strided_features: ran {}",
        maskattn::kernel_path()
    ));
    common::report_bf16_path("strided_features");
    for (qs, ks) in [
        ([1, 2, 37, 24], [1, 2, 53, 24]),
        ([2, 1, 70, 17], [2, 1, 70, 17]),
        ([1, 1, 130, 64], [1, 1, 100, 64]),
    ] {
        for mask in [Mask::full(), Mask::causal()] {
            check("f32", |x| x, (qs, ks), &mask);
            check("bf16", bf16::from_f32, (qs, ks), &mask);
        }
    }
}
