//! Bad input is a typed error that names the problem, never a panic inside a kernel.

use maskattn::{AttnError, Bias, BlockMask, DenseMask, Dropout, Mask, MaskShape, Params, View};

fn views<'a>(
    q: &'a [f32],
    kv: &'a [f32],
    qs: [usize; 4],
    ks: [usize; 4],
) -> (View<'a>, View<'a>, View<'a>) {
    (
        View::bhld("q", q, qs).unwrap(),
        View::bhld("k", kv, ks).unwrap(),
        View::bhld("v", kv, ks).unwrap(),
    )
}

fn run(qs: [usize; 4], ks: [usize; 4], mask: &Mask, scale: Option<f32>) -> Result<(), AttnError> {
    let q = vec![0.5f32; qs.iter().product()];
    let kv = vec![0.25f32; ks.iter().product()];
    let (q, k, v) = views(&q, &kv, qs, ks);
    let block = BlockMask::new(mask, MaskShape::new(qs[0], qs[1], qs[2], ks[2]))?;
    let params = Params {
        scale,
        ..Default::default()
    };
    maskattn::forward(&q, &k, &v, &block, &params).map(|_| ())
}

#[test]
fn mismatched_shapes() {
    let e = run([1, 2, 4, 8], [1, 2, 4, 16], &Mask::full(), None).unwrap_err();
    assert!(matches!(e, AttnError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("head dim"), "{e}");
    let e = run([2, 2, 4, 8], [1, 2, 4, 8], &Mask::full(), None).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
}

#[test]
fn head_ratio() {
    let e = run([1, 3, 4, 8], [1, 2, 4, 8], &Mask::full(), None).unwrap_err();
    assert_eq!(
        e,
        AttnError::HeadRatio {
            q_heads: 3,
            kv_heads: 2
        }
    );
}

#[test]
fn zero_length() {
    let e = run([1, 2, 0, 8], [1, 2, 4, 8], &Mask::full(), None).unwrap_err();
    assert!(matches!(e, AttnError::ZeroDim { what: "L_q" }), "{e}");
}

#[test]
fn non_finite_scale() {
    for s in [f32::NAN, f32::INFINITY] {
        let e = run([1, 2, 4, 8], [1, 2, 4, 8], &Mask::full(), Some(s)).unwrap_err();
        assert!(matches!(e, AttnError::NonFiniteScale(_)), "{e}");
    }
}

#[test]
fn mask_data_that_does_not_fit() {
    let qs = [2, 2, 4, 8];
    let cases = [
        (Mask::key_padding(vec![1, 2, 3]), "batch rows"),
        (Mask::key_padding(vec![5]), "exceeds L_k"),
        (Mask::documents(vec![0i64; 5], 1), "document ids"),
        (Mask::key_keep(vec![true; 3], 1), "keep"),
        (Mask::per_head(vec![Mask::causal()]), "per-head"),
        (
            Mask::dense(DenseMask::new(vec![true; 3 * 4 * 4], [3, 1, 4, 4]).unwrap()),
            "broadcast",
        ),
        (Mask::causal() & Mask::prefix(9), "prefix"),
        (Mask::chunks(0), "chunk size"),
        (Mask::neighbourhood(3, 3, 1), "neighbourhood grid"),
        (Mask::block_causal(0) | Mask::full(), "chunk size"),
    ];
    for (mask, word) in cases {
        let e = run(qs, qs, &mask, None).unwrap_err();
        assert!(matches!(e, AttnError::Mask(_)), "{e}");
        assert!(e.to_string().contains(word), "{mask:?}: {e}");
    }
    assert!(DenseMask::new(vec![true; 5], [1, 1, 2, 2]).is_err());
}

#[test]
fn block_mask_for_another_shape() {
    let q = vec![0.0f32; 2 * 4 * 8];
    let (q, k, v) = views(&q, &q, [1, 2, 4, 8], [1, 2, 4, 8]);
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(1, 2, 4, 5)).unwrap();
    let e = maskattn::forward(&q, &k, &v, &block, &Params::default()).unwrap_err();
    assert!(matches!(e, AttnError::BlockMaskShape { .. }), "{e}");
    // Typed fields, not Debug strings: the two shapes themselves.
    assert_eq!(
        e,
        AttnError::BlockMaskShape {
            compiled: MaskShape::new(1, 2, 4, 5),
            call: MaskShape::new(1, 2, 4, 4),
        }
    );
    assert_eq!(
        e.to_string(),
        "block mask was compiled for B 1, H 2, L_q 4, L_k 5, but the call has B 1, H 2, L_q 4, L_k 4"
    );
}

#[test]
fn bad_views_bias_lse_and_tiles() {
    let data = vec![0f32; 10];
    assert!(matches!(
        View::bhld("q", &data, [1, 1, 3, 4]),
        Err(AttnError::ShapeMismatch { .. })
    ));
    let e = View::strided("k", &data, [1, 1, 3, 4], [0, 0, 4, 1]).unwrap_err();
    assert!(e.to_string().starts_with("k:"), "{e}");
    assert!(Bias::new(&data, [1, 1, 2, 4]).is_err());
    // Dims whose product wraps around to the buffer's length (2^64 ≡ 0): refused, not taken.
    let e = Bias::new(&[], [1 << 32, 1 << 32, 1, 1]).unwrap_err();
    assert!(e.to_string().contains("more than usize::MAX"), "{e}");

    let q = vec![0.0f32; 2 * 4 * 8];
    let (qv, k, v) = views(&q, &q, [1, 2, 4, 8], [1, 2, 4, 8]);
    let bias = Bias::new(&data[..8], [1, 1, 2, 4]).unwrap();
    let block = BlockMask::new(&Mask::full(), MaskShape::new(1, 2, 4, 4)).unwrap();
    let e = maskattn::forward(&qv, &k, &v, &block, &Params::default().with_bias(bias)).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");

    let fwd = maskattn::forward(&qv, &k, &v, &block, &Params::default()).unwrap();
    let out = View::bhld("out", &fwd.out, [1, 2, 4, 8]).unwrap();
    let e = maskattn::backward(
        &maskattn::Qkv::new(&qv, &k, &v),
        &out,
        &fwd.lse[..3],
        &out,
        &block,
        &Params::default(),
    )
    .unwrap_err();
    assert_eq!(
        e,
        AttnError::LseLength {
            got: 3,
            expected: 8
        }
    );
    let short = View::bhld("dout", &q[..32], [1, 1, 4, 8]).unwrap();
    let e = maskattn::backward(
        &maskattn::Qkv::new(&qv, &k, &v),
        &out,
        &fwd.lse,
        &short,
        &block,
        &Params::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("dout"), "{e}");

    let e = BlockMask::with_tiles(&Mask::full(), MaskShape::new(1, 1, 4, 4), 0, 8).unwrap_err();
    assert!(matches!(e, AttnError::BadTiles { .. }));
    for p in [-0.1, 1.0, f32::NAN] {
        assert!(Dropout::new(p, 1)
            .unwrap_err()
            .to_string()
            .contains("dropout"));
    }
    let e = BlockMask::with_tiles(&Mask::full(), MaskShape::new(1, 1, 4, 4), 0, 8).unwrap_err();
    assert!(matches!(e, AttnError::BadTiles { .. }));
}

#[test]
fn caller_buffers_of_the_wrong_size() {
    let q = vec![0.5f32; 2 * 4 * 8];
    let kv = vec![0.25f32; 5 * 8];
    let (qv, k, v) = views(&q, &kv, [1, 2, 4, 8], [1, 1, 5, 8]);
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(1, 2, 4, 5)).unwrap();
    let p = Params::default();
    let (mut out, mut lse) = (vec![0f32; 64], vec![0f32; 8]);
    let e = maskattn::forward_into(&qv, &k, &v, &block, &p, &mut out[..63], &mut lse).unwrap_err();
    assert!(matches!(e, AttnError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("out holds 63 values"), "{e}");
    let e = maskattn::forward_into(&qv, &k, &v, &block, &p, &mut out, &mut lse[..7]).unwrap_err();
    assert_eq!(
        e,
        AttnError::LseLength {
            got: 7,
            expected: 8
        }
    );
    maskattn::forward_into(&qv, &k, &v, &block, &p, &mut out, &mut lse).unwrap();

    let ov = View::bhld("out", &out, [1, 2, 4, 8]).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0f32; 64], vec![0f32; 40], vec![0f32; 40]);
    // dk sized like q (a GQA slip): named, with the size it needs.
    let mut dk_wrong = vec![0f32; 64];
    let grads = maskattn::GradsMut::new(&mut dq, &mut dk_wrong, &mut dv);
    let e = maskattn::backward_into(
        &maskattn::Qkv::new(&qv, &k, &v),
        &ov,
        &lse,
        &ov,
        &block,
        &p,
        grads,
    )
    .unwrap_err();
    assert!(e.to_string().contains("dk holds 64 values"), "{e}");
    assert!(e.to_string().contains("= 40"), "{e}");
    let grads = maskattn::GradsMut::new(&mut dq, &mut dk, &mut dv);
    maskattn::backward_into(
        &maskattn::Qkv::new(&qv, &k, &v),
        &ov,
        &lse,
        &ov,
        &block,
        &p,
        grads,
    )
    .unwrap();
}
