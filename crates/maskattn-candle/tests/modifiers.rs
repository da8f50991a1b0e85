//! The score modifiers through the attention op: soft-capping, a dense bias, ALiBi, sinks
//! and T5 relative positions, alone and together, with masks and grouped-query heads. Every
//! parameter's gradient (and out, dq, dk, dv) against candle's own autograd through the
//! plain-ops reference (golden in f64, naive in f32, the accuracy rule), and against the
//! kernel crate's f64 reference.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, tensor, to_f32_vec};
use maskattn::{Mask, MaskShape, Params, View};
use maskattn_candle::{attention, reference, AttnOptions, RelPos};

/// Which modifiers a case sets.
#[derive(Clone, Copy, Debug)]
struct Set {
    softcap: bool,
    bias: bool,
    alibi: bool,
    sinks: bool,
    rel: bool,
}

const ALL: Set = Set {
    softcap: true,
    bias: true,
    alibi: true,
    sinks: true,
    rel: true,
};
const NONE: Set = Set {
    softcap: false,
    bias: false,
    alibi: false,
    sinks: false,
    rel: false,
};

/// The parameter tensors of a case, f32, and which broadcast form the bias takes.
struct ParamsData {
    bias: Tensor,
    alibi: Tensor,
    sinks: Tensor,
    rel: Tensor,
}

const BUCKETS: usize = 8;
const MAX_DISTANCE: usize = 12;
const SOFTCAP: f32 = 0.7;

impl ParamsData {
    fn new(bias_dims: [usize; 4], hq: usize, seed: u64) -> Self {
        let scaled = |t: Tensor, s: f64| (t * s).unwrap();
        ParamsData {
            bias: scaled(tensor(&bias_dims, seed + 1).unwrap(), 2.0),
            // Positive slopes, as ALiBi has them (the gradient does not care).
            alibi: (scaled(tensor(&[hq], seed + 2).unwrap(), 0.1) + 0.2).unwrap(),
            sinks: scaled(tensor(&[hq], seed + 3).unwrap(), 1.5),
            rel: tensor(&[BUCKETS, hq], seed + 4).unwrap(),
        }
    }
}

/// Backpropagates `Σ out · dout` through `f(q, k, v, opts)` with every tensor a `Var` of
/// `dtype`; returns out, dq, dk, dv and then the gradient of each modifier set, by name.
#[allow(clippy::too_many_arguments)]
fn run(
    qkv: [&Tensor; 3],
    dout: &Tensor,
    p: &ParamsData,
    set: Set,
    bidirectional: bool,
    dtype: DType,
    f: impl Fn(&Tensor, &Tensor, &Tensor, &AttnOptions) -> candle_core::Result<Tensor>,
) -> Vec<(&'static str, Tensor)> {
    let var = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
    let (q, k, v) = (var(qkv[0]), var(qkv[1]), var(qkv[2]));
    let (bias, alibi, sinks, rel) = (var(&p.bias), var(&p.alibi), var(&p.sinks), var(&p.rel));
    let opts = AttnOptions {
        softcap: set.softcap.then_some(SOFTCAP),
        bias: set.bias.then(|| bias.as_tensor().clone()),
        alibi: set.alibi.then(|| alibi.as_tensor().clone()),
        sinks: set.sinks.then(|| sinks.as_tensor().clone()),
        rel: set.rel.then(|| RelPos {
            table: rel.as_tensor().clone(),
            num_buckets: BUCKETS,
            max_distance: MAX_DISTANCE,
            bidirectional,
        }),
        ..Default::default()
    };
    let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts).unwrap();
    let loss = (&out * dout.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let grad = |v: &Var| g.get(v.as_tensor()).expect("a gradient").clone();
    let mut r = vec![
        ("out", out.clone()),
        ("dq", grad(&q)),
        ("dk", grad(&k)),
        ("dv", grad(&v)),
    ];
    for (on, name, v) in [
        (set.bias, "dbias", &bias),
        (set.alibi, "dalibi", &alibi),
        (set.sinks, "dsinks", &sinks),
        (set.rel, "drel", &rel),
    ] {
        if on {
            r.push((name, grad(v)));
        }
    }
    r
}

fn ours(
    mask: &Mask,
) -> impl Fn(&Tensor, &Tensor, &Tensor, &AttnOptions) -> candle_core::Result<Tensor> + '_ {
    move |q, k, v, o| Ok(attention(q, k, v, mask, o.clone())?.out)
}

fn plain(
    mask: &Mask,
) -> impl Fn(&Tensor, &Tensor, &Tensor, &AttnOptions) -> candle_core::Result<Tensor> + '_ {
    move |q, k, v, o| reference::attention_with_options(q, k, v, mask, o)
}

/// The kernel crate's f64 reference on the same case: out, dq, dk, dv, then the modifier
/// gradients in the order of [`run`].
#[allow(clippy::too_many_arguments)]
fn kernel_reference(
    qkv: [&Tensor; 3],
    dout: &Tensor,
    p: &ParamsData,
    set: Set,
    bidirectional: bool,
    mask: &Mask,
) -> Vec<Vec<f32>> {
    let dims = |t: &Tensor| -> [usize; 4] { t.dims().try_into().unwrap() };
    let vals = |t: &Tensor| to_f32_vec(t).unwrap();
    let (q, k, v, g) = (vals(qkv[0]), vals(qkv[1]), vals(qkv[2]), vals(dout));
    let (bias, alibi, sinks, rel) = (vals(&p.bias), vals(&p.alibi), vals(&p.sinks), vals(&p.rel));
    let (qv, kv, vv, gv) = (
        View::bhld("q", &q, dims(qkv[0])).unwrap(),
        View::bhld("k", &k, dims(qkv[1])).unwrap(),
        View::bhld("v", &v, dims(qkv[2])).unwrap(),
        View::bhld("dout", &g, dims(dout)).unwrap(),
    );
    let mut params = Params::default();
    if set.softcap {
        params = params.with_softcap(SOFTCAP);
    }
    if set.bias {
        params = params.with_bias(maskattn::Bias::new(&bias, dims(&p.bias)).unwrap());
    }
    if set.alibi {
        params = params.with_alibi(&alibi);
    }
    if set.sinks {
        params = params.with_sinks(&sinks);
    }
    if set.rel {
        params = params
            .with_rel(maskattn::RelBias::new(&rel, BUCKETS, MAX_DISTANCE, bidirectional).unwrap());
    }
    let f = maskattn::reference::forward::<f64>(&qv, &kv, &vv, mask, &params).unwrap();
    let b = maskattn::reference::backward::<f64>(&qv, &kv, &vv, mask, &params, &gv).unwrap();
    let f32s = |x: &[f64]| x.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let mut r = vec![f32s(&f.out), f32s(&b.dq), f32s(&b.dk), f32s(&b.dv)];
    for (on, grad) in [
        (set.bias, &b.params.dbias),
        (set.alibi, &b.params.dalibi),
        (set.sinks, &b.params.dsinks),
        (set.rel, &b.params.drel),
    ] {
        if on {
            r.push(f32s(
                grad.as_ref().expect("the reference gives every gradient"),
            ));
        }
    }
    r
}

fn masks(b: usize, lk: usize) -> Vec<Mask> {
    vec![
        Mask::full(),
        Mask::causal(),
        Mask::window(4, 2) & Mask::key_padding((0..b).map(|x| lk - x * lk / 3).collect::<Vec<_>>()),
        // Rows that see nothing: zero out and gradients, LSE the sink's alone.
        Mask::causal_top_left() & !Mask::key_padding(vec![2]),
        Mask::causal_top_left(),
        Mask::key_padding(vec![0]),
    ]
}

#[test]
fn every_parameter_gets_the_gradient_of_candles_autograd_and_of_the_f64_reference() {
    // (b, hq, hkv, lq, lk, d, bias broadcast form)
    let shapes = [
        (2, 4, 2, 23, 23, 16, [2, 4, 23, 23]),
        (1, 3, 1, 17, 41, 8, [1, 1, 17, 41]),
        (2, 2, 2, 30, 19, 12, [1, 2, 30, 19]),
        (1, 2, 1, 1, 37, 16, [1, 2, 1, 37]),
    ];
    let sets = [
        ALL,
        Set {
            softcap: true,
            ..NONE
        },
        Set { bias: true, ..NONE },
        Set {
            alibi: true,
            ..NONE
        },
        Set {
            sinks: true,
            ..NONE
        },
        Set { rel: true, ..NONE },
        Set {
            softcap: true,
            rel: true,
            sinks: true,
            ..NONE
        },
    ];
    let mut checked = 0;
    for (n, &(b, hq, hkv, lq, lk, d, bias_dims)) in shapes.iter().enumerate() {
        let seed = 100 * n as u64;
        let q = tensor(&[b, hq, lq, d], seed + 1).unwrap();
        // Keys strided: [B, L, H, d] viewed through a transpose.
        let k = tensor(&[b, lk, hkv, d], seed + 2)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let v = tensor(&[b, hkv, lk, d], seed + 3).unwrap();
        let dout = tensor(&[b, hq, lq, d], seed + 4).unwrap();
        let p = ParamsData::new(bias_dims, hq, seed + 10);
        for (mi, mask) in masks(b, lk).into_iter().enumerate() {
            for (si, &set) in sets.iter().enumerate() {
                let bidirectional = (mi + si) % 2 == 0;
                let qkv = [&q, &k, &v];
                let got = run(qkv, &dout, &p, set, bidirectional, DType::F32, ours(&mask));
                let golden = run(qkv, &dout, &p, set, bidirectional, DType::F64, plain(&mask));
                let naive = run(qkv, &dout, &p, set, bidirectional, DType::F32, plain(&mask));
                let f64ref = kernel_reference(qkv, &dout, &p, set, bidirectional, &mask);
                assert_eq!(got.len(), golden.len());
                // Masks 0-2 have rows that see several keys: there every parameter has a
                // non-zero gradient (a row that sees one key has dS = 0).
                let sees = mi <= 2;
                for (i, (name, t)) in got.iter().enumerate() {
                    let what =
                        format!("shape {n} {mask:?} {set:?} bidirectional {bidirectional}: {name}");
                    assert_eq!(t.dims(), golden[i].1.dims(), "{what}");
                    assert_close(&what, t, &golden[i].1, &naive[i].1);
                    // The kernel crate's reference: the same golden values, computed another way.
                    let (a, r) = (to_f32_vec(t).unwrap(), &f64ref[i]);
                    let worst = a
                        .iter()
                        .zip(r)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    let size = r.iter().fold(1f32, |m, x| m.max(x.abs()));
                    assert!(
                        worst < 1e-4 * size,
                        "{what}: {worst} from maskattn::reference (values up to {size})"
                    );
                    if i >= 4 {
                        // Every parameter's gradient is finite, and not all zero where some
                        // row sees something.
                        assert!(a.iter().all(|x| x.is_finite()), "{what}: not finite");
                        if sees {
                            assert!(a.iter().any(|&x| x != 0.0), "{what}: all zero");
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    eprintln!(
        "modifiers through the candle op: {checked} results checked (kernel path {:?})",
        maskattn::kernel_path()
    );
}

#[test]
fn parameters_that_are_not_variables_take_the_single_op_path() {
    // Constant slopes and sinks (plain tensors): no tap, one op; q, k, v gradients still right.
    let (b, h, l, d) = (1, 2, 20, 8);
    let q = tensor(&[b, h, l, d], 1).unwrap();
    let k = tensor(&[b, h, l, d], 2).unwrap();
    let dout = tensor(&[b, h, l, d], 3).unwrap();
    let p = ParamsData::new([1, 1, l, l], h, 4);
    let mask = Mask::causal();
    let opts = AttnOptions {
        alibi: Some(p.alibi.clone()),
        sinks: Some(p.sinks.clone()),
        softcap: Some(2.0),
        ..Default::default()
    };
    let qv = Var::from_tensor(&q).unwrap();
    let out = attention(qv.as_tensor(), &k, &k, &mask, opts.clone())
        .unwrap()
        .out;
    let g = (&out * &dout)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dq = g.get(qv.as_tensor()).unwrap();
    let qr = Var::from_tensor(&q).unwrap();
    let out_r = reference::attention_with_options(qr.as_tensor(), &k, &k, &mask, &opts).unwrap();
    let gr = (&out_r * &dout)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let q64 = Var::from_tensor(&f64s(&q)).unwrap();
    let opts64 = AttnOptions {
        alibi: Some(f64s(&p.alibi)),
        sinks: Some(f64s(&p.sinks)),
        ..opts.clone()
    };
    let out64 =
        reference::attention_with_options(q64.as_tensor(), &f64s(&k), &f64s(&k), &mask, &opts64)
            .unwrap();
    let g64 = (&out64 * f64s(&dout))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close("out", &out, &out64, &out_r);
    assert_close(
        "dq",
        dq,
        g64.get(q64.as_tensor()).unwrap(),
        gr.get(qr.as_tensor()).unwrap(),
    );
}

#[test]
fn lse_includes_the_sink_and_bad_modifiers_are_errors() {
    let (b, h, l, d) = (1, 2, 6, 8);
    let q = tensor(&[b, h, l, d], 1).unwrap();
    let sinks = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap();
    // The first two rows see nothing: their LSE is the sink's logit alone.
    let mask = Mask::causal_top_left() & !Mask::key_padding(vec![2]);
    let a = attention(
        &q,
        &q,
        &q,
        &mask,
        AttnOptions {
            sinks: Some(sinks.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let lse: Vec<f32> = a.lse.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&lse[0..2], &[0.5, 0.5]);
    assert_eq!(&lse[6..8], &[-1.0, -1.0]);
    let ks = reference::dense_mask(&mask, MaskShape::new(b, h, l, l), DType::F32, &Device::Cpu);
    assert!(ks.is_ok());

    let bad = |opts: AttnOptions, want: &str| {
        let e = attention(&q, &q, &q, &Mask::full(), opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e} should say {want}");
    };
    bad(
        AttnOptions {
            sinks: Some(Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()),
            ..Default::default()
        },
        "[H_q]",
    );
    bad(
        AttnOptions {
            alibi: Some(Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap()),
            ..Default::default()
        },
        "f32",
    );
    bad(
        AttnOptions {
            rel: Some(RelPos {
                table: Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
                num_buckets: 4,
                max_distance: 8,
                bidirectional: false,
            }),
            ..Default::default()
        },
        "num_buckets",
    );
    bad(
        AttnOptions {
            bias: Some(Tensor::zeros((1, 3, l, l), DType::F32, &Device::Cpu).unwrap()),
            ..Default::default()
        },
        "bias",
    );
    bad(
        AttnOptions {
            softcap: Some(-1.0),
            ..Default::default()
        },
        "oft",
    );
}

#[test]
fn the_kernel_backward_runs_once_per_backward() {
    let (b, h, l, d) = (1, 2, 12, 8);
    let p = ParamsData::new([1, h, l, l], h, 7);
    let dout = tensor(&[b, h, l, d], 3).unwrap();
    let qkv = [
        &tensor(&[b, h, l, d], 1).unwrap(),
        &tensor(&[b, h, l, d], 2).unwrap(),
        &tensor(&[b, h, l, d], 4).unwrap(),
    ];
    let mask = Mask::causal();
    for set in [
        NONE,
        ALL,
        Set {
            softcap: true,
            ..NONE
        },
        Set {
            sinks: true,
            ..NONE
        },
    ] {
        let before = maskattn_candle::kernel_backward_calls();
        run(qkv, &dout, &p, set, false, DType::F32, ours(&mask));
        let calls = maskattn_candle::kernel_backward_calls() - before;
        assert_eq!(calls, 1, "{set:?}: {calls} kernel backward calls");
    }
    // Parameters that are constants: the one op's own backward, once.
    let before = maskattn_candle::kernel_backward_calls();
    let q = Var::from_tensor(qkv[0]).unwrap();
    let opts = AttnOptions {
        alibi: Some(p.alibi.clone()),
        ..Default::default()
    };
    let out = attention(q.as_tensor(), qkv[1], qkv[2], &mask, opts)
        .unwrap()
        .out;
    (&out * &dout)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(maskattn_candle::kernel_backward_calls() - before, 1);
}
