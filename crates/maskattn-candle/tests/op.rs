//! The attention op against the same attention in plain candle ops: forward and the
//! gradients of q, k, v, under the accuracy rule (golden: plain ops in f64; naive: plain ops
//! in f32).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, tensor};
use maskattn::Mask;
use maskattn_candle::{attention, reference, AttnOptions};

/// Runs `f(q, k, v)`, backpropagates `Σ out · dout`, returns (out, dq, dk, dv).
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> [Tensor; 4] {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let loss = (&out * dout.to_dtype(out.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    [
        out,
        g.get(qv.as_tensor()).unwrap().clone(),
        g.get(kv.as_tensor()).unwrap().clone(),
        g.get(vv.as_tensor()).unwrap().clone(),
    ]
}

fn masks(b: usize, lq: usize, lk: usize) -> Vec<Mask> {
    let docs: Vec<i64> = (0..lq).map(|i| (i * 3 / lq) as i64).collect();
    let mut v = vec![
        Mask::full(),
        Mask::causal(),
        Mask::window(5, 0) & Mask::key_padding((0..b).map(|x| lk - x * lk / 3).collect::<Vec<_>>()),
        Mask::prefix(lk / 3),
        Mask::key_padding(vec![0]), // every row sees nothing
    ];
    if lq == lk {
        v.push(Mask::documents(docs, 1) & Mask::causal());
    }
    v
}

#[test]
fn forward_and_gradients_match_plain_candle() {
    // (b, hq, hkv, lq, lk, d), and whether q/k/v come as [B, L, H, d] viewed through a transpose.
    let shapes = [
        (2, 4, 2, 37, 37, 16, false),
        (1, 2, 2, 70, 45, 24, true),
        (2, 3, 1, 19, 80, 8, true),
        (1, 2, 1, 1, 33, 32, false),
    ];
    for (n, &(b, hq, hkv, lq, lk, d, strided)) in shapes.iter().enumerate() {
        let seed = 10 * n as u64;
        let make = |h: usize, l: usize, s: u64| {
            if strided {
                tensor(&[b, l, h, d], s).unwrap().transpose(1, 2).unwrap()
            } else {
                tensor(&[b, h, l, d], s).unwrap()
            }
        };
        let (q, k, v) = (
            make(hq, lq, seed + 1),
            make(hkv, lk, seed + 2),
            make(hkv, lk, seed + 3),
        );
        let dout = tensor(&[b, hq, lq, d], seed + 4).unwrap();
        for mask in masks(b, lq, lk) {
            let ours = run(&q, &k, &v, &dout, |q, k, v| {
                Ok(attention(q, k, v, &mask, AttnOptions::default())?.out)
            });
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let golden = run(&f64s(&q), &f64s(&k), &f64s(&v), &f64s(&dout), |q, k, v| {
                reference::attention(q, k, v, &mask, None)
            });
            let naive = run(&q, &k, &v, &dout, |q, k, v| {
                reference::attention(q, k, v, &mask, None)
            });
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                assert_close(
                    &format!("shape {n} {mask:?} {name}"),
                    &ours[i],
                    &golden[i],
                    &naive[i],
                );
            }
        }
    }
}

#[test]
fn lse_is_returned_and_minus_infinity_for_empty_rows() {
    let q = tensor(&[1, 2, 6, 8], 1).unwrap();
    let k = tensor(&[1, 2, 6, 8], 2).unwrap();
    // Queries 0 and 1 see nothing: top-left causal and keys from 2 on.
    let mask = Mask::causal_top_left() & !Mask::key_padding(vec![2]);
    let a = attention(&q, &k, &k, &mask, AttnOptions::default()).unwrap();
    let lse: Vec<f32> = a.lse.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.lse.dims(), &[1, 2, 6]);
    for h in 0..2 {
        assert_eq!(lse[h * 6], f32::NEG_INFINITY);
        assert_eq!(lse[h * 6 + 1], f32::NEG_INFINITY);
        assert!(lse[h * 6 + 2..h * 6 + 6].iter().all(|x| x.is_finite()));
    }
    let out: Vec<f32> = a.out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(out[..16].iter().all(|&x| x == 0.0));
}

#[test]
fn bf16_and_f16_tensors_work() {
    let (q, k, v) = (
        tensor(&[2, 4, 33, 16], 1).unwrap(),
        tensor(&[2, 2, 40, 16], 2).unwrap(),
        tensor(&[2, 2, 40, 16], 3).unwrap(),
    );
    let mask = Mask::causal();
    let dout = tensor(&[2, 4, 33, 16], 4).unwrap();
    let exact = run(&q, &k, &v, &dout, |q, k, v| {
        Ok(attention(q, k, v, &mask, AttnOptions::default())?.out)
    });
    for dt in [DType::BF16, DType::F16] {
        let c = |t: &Tensor| t.to_dtype(dt).unwrap();
        let low = run(&c(&q), &c(&k), &c(&v), &dout, |q, k, v| {
            Ok(attention(q, k, v, &mask, AttnOptions::default())?.out)
        });
        for i in 0..4 {
            assert_eq!(low[i].dtype(), dt);
            let diff = common::max_diff(&low[i], &exact[i]);
            // Inputs rounded to 8 (bf16) or 11 (f16) bits: errors of a few 1e-2 at most.
            assert!(diff < 0.05, "{dt:?} result {i}: {diff}");
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let q = tensor(&[1, 3, 4, 8], 1).unwrap();
    let k = tensor(&[1, 2, 4, 8], 2).unwrap();
    let e = attention(&q, &k, &k, &Mask::full(), AttnOptions::default()).unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
    let k3 = Tensor::zeros((1, 4, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(attention(&q, &k3, &k3, &Mask::full(), AttnOptions::default()).is_err());
    let kd = tensor(&[1, 3, 4, 8], 2)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let e = attention(&q, &kd, &kd, &Mask::full(), AttnOptions::default()).unwrap_err();
    assert!(e.to_string().contains("f32, bf16, f16"), "{e}");
    let e = attention(
        &q,
        &q,
        &q,
        &Mask::key_padding(vec![9]),
        AttnOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
}
