//! The layer against the same layer with plain-candle attention (forward, input and
//! parameter gradients, under the accuracy rule), gradients reaching every parameter, and
//! bad input.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, max_diff, tensor};
use maskattn::Mask;
use maskattn_candle::{reference, MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode};

/// A layer whose parameters live in a fresh VarMap of `dtype`, set to `weights` if given.
fn layer(
    cfg: &MhaConfig,
    dtype: DType,
    weights: Option<&HashMap<String, Tensor>>,
) -> (MaskedMultiHeadAttention, VarMap) {
    let vm = VarMap::new();
    let l = MaskedMultiHeadAttention::new(
        cfg.clone(),
        VarBuilder::from_varmap(&vm, dtype, &Device::Cpu),
    )
    .unwrap();
    if let Some(w) = weights {
        let mut vm2 = vm.clone();
        for (name, t) in w {
            vm2.set_one(name, t.to_dtype(dtype).unwrap()).unwrap();
        }
    }
    (l, vm)
}

/// Runs the layer, backpropagates `Σ out · dout`; returns out, d x_q, d x_kv and the
/// parameter gradients by name.
fn run(
    l: &MaskedMultiHeadAttention,
    vm: &VarMap,
    xq: &Tensor,
    xkv: Option<&Tensor>,
    dout: &Tensor,
    plain: bool,
    mask: &Mask,
) -> (Vec<Tensor>, HashMap<String, Tensor>) {
    let xq = Var::from_tensor(xq).unwrap();
    let xkv = xkv.map(|x| Var::from_tensor(x).unwrap());
    let kv = xkv.as_ref().map_or(xq.as_tensor(), |v| v.as_tensor());
    let out = if plain {
        reference::mha_forward(
            l,
            xq.as_tensor(),
            &MhaOptions {
                keys: Some(kv),
                ..MhaOptions::new(mask)
            },
        )
        .unwrap()
    } else {
        l.forward(
            xq.as_tensor(),
            &MhaOptions {
                keys: Some(kv),
                ..MhaOptions::new(mask)
            },
        )
        .unwrap()
    };
    let loss = (&out * dout.to_dtype(out.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let mut res = vec![out, g.get(xq.as_tensor()).unwrap().clone()];
    if let Some(x) = &xkv {
        res.push(g.get(x.as_tensor()).unwrap().clone());
    }
    let params = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (res, params)
}

#[test]
fn layer_matches_the_plain_candle_layer() {
    // (config, batch, L_q, L_k or None for self-attention)
    let cases = [
        (
            MhaConfig::new(32, 4).with_kv_heads(2).with_rope(10_000.0),
            2,
            23,
            None,
        ),
        (MhaConfig::new(24, 3).with_kdim_vdim(16, 16), 2, 9, Some(30)),
        (
            MhaConfig::new(32, 4)
                .with_kv_heads(1)
                .with_bias(false)
                .with_head_dim(12),
            1,
            40,
            None,
        ),
    ];
    for (n, (cfg, b, lq, lk)) in cases.into_iter().enumerate() {
        let (l32, vm32) = layer(&cfg, DType::F32, None);
        let w: HashMap<String, Tensor> = vm32
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let (l64, vm64) = layer(&cfg, DType::F64, Some(&w));
        let xq = tensor(&[b, lq, cfg.d_model], 100 + n as u64).unwrap();
        let xkv = lk.map(|lk| tensor(&[b, lk, cfg.kdim], 200 + n as u64).unwrap());
        let lk_ = lk.unwrap_or(lq);
        let dout = tensor(&[b, lq, cfg.d_model], 300 + n as u64).unwrap();
        let masks = [
            Mask::full(),
            Mask::key_padding((0..b).map(|i| lk_ - i * lk_ / 3).collect::<Vec<_>>()),
            if lk.is_none() {
                Mask::causal()
            } else {
                Mask::window(4, 4)
            },
        ];
        for mask in &masks {
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let (ours, gp_ours) = run(&l32, &vm32, &xq, xkv.as_ref(), &dout, false, mask);
            let (naive, gp_naive) = run(&l32, &vm32, &xq, xkv.as_ref(), &dout, true, mask);
            let (gold, gp_gold) = run(
                &l64,
                &vm64,
                &f64s(&xq),
                xkv.as_ref().map(f64s).as_ref(),
                &f64s(&dout),
                true,
                mask,
            );
            for (i, what) in ["out", "d x_q", "d x_kv"]
                .iter()
                .enumerate()
                .take(ours.len())
            {
                assert_close(
                    &format!("case {n} {mask:?} {what}"),
                    &ours[i],
                    &gold[i],
                    &naive[i],
                );
            }
            assert_eq!(gp_ours.len(), if cfg.bias { 8 } else { 4 });
            for (name, g) in &gp_ours {
                assert_close(
                    &format!("case {n} {mask:?} grad {name}"),
                    g,
                    &gp_gold[name],
                    &gp_naive[name],
                );
            }
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient_when_training() {
    let cfg = MhaConfig::new(32, 4)
        .with_kv_heads(2)
        .with_rope(10_000.0)
        .with_dropout(0.1);
    let (l, vm) = layer(&cfg, DType::F32, None);
    let x = tensor(&[2, 17, 32], 5).unwrap();
    let out = l
        .forward(
            &x,
            &MhaOptions {
                mode: Mode::Train { seed: 3 },
                ..MhaOptions::new(&Mask::causal())
            },
        )
        .unwrap();
    let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let vars = vm.all_vars();
    assert_eq!(vars.len(), 8);
    for v in vars {
        let gv = g
            .get(v.as_tensor())
            .expect("a gradient for every parameter");
        let m = gv
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            m > 0.0,
            "a zero gradient for a parameter of shape {:?}",
            v.dims()
        );
    }
}

#[test]
fn dropout_is_seeded_and_off_in_eval() {
    let cfg = MhaConfig::new(16, 2).with_dropout(0.5);
    let (l, _) = layer(&cfg, DType::F32, None);
    let x = tensor(&[1, 12, 16], 1).unwrap();
    let m = Mask::full();
    let a = l
        .forward(
            &x,
            &MhaOptions {
                mode: Mode::Train { seed: 1 },
                ..MhaOptions::new(&m)
            },
        )
        .unwrap();
    let b = l
        .forward(
            &x,
            &MhaOptions {
                mode: Mode::Train { seed: 1 },
                ..MhaOptions::new(&m)
            },
        )
        .unwrap();
    let c = l
        .forward(
            &x,
            &MhaOptions {
                mode: Mode::Train { seed: 2 },
                ..MhaOptions::new(&m)
            },
        )
        .unwrap();
    let e1 = l.forward(&x, &MhaOptions::new(&m)).unwrap();
    let plain = reference::mha_forward(&l, &x, &MhaOptions::new(&m)).unwrap();
    let diff = max_diff;
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 1e-3);
    assert!(diff(&e1, &plain) < 1e-5);
}

#[test]
fn attention_weights_are_the_softmax_and_respect_the_mask() {
    let cfg = MhaConfig::new(16, 2).with_kv_heads(1);
    let (l, _) = layer(&cfg, DType::F32, None);
    let x = tensor(&[2, 7, 16], 9).unwrap();
    let mask = Mask::causal() & Mask::key_padding(vec![7, 4]);
    let (out, w) = l.forward_with_weights(&x, &MhaOptions::new(&mask)).unwrap();
    assert_eq!(w.dims(), &[2, 2, 7, 7]);
    let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    for b in 0..2 {
        for h in 0..2 {
            for i in 0..7 {
                let row = &ws[((b * 2 + h) * 7 + i) * 7..][..7];
                let visible = |j: usize| j <= i && j < [7, 4][b];
                for (j, &p) in row.iter().enumerate() {
                    if !visible(j) {
                        assert_eq!(p, 0.0, "hidden pair ({b},{h},{i},{j}) has weight {p}");
                    }
                }
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
            }
        }
    }
    let again = l.forward(&x, &MhaOptions::new(&mask)).unwrap();
    assert_eq!(max_diff(&out, &again), 0.0);
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let vb = |vm: &VarMap| VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let vm = VarMap::new();
    let e =
        MaskedMultiHeadAttention::new(MhaConfig::new(32, 4).with_kv_heads(3), vb(&vm)).unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
    let e = MaskedMultiHeadAttention::new(
        MhaConfig::new(32, 4).with_head_dim(7).with_rope(1e4),
        vb(&vm),
    )
    .unwrap_err();
    assert!(e.to_string().contains("even head_dim"), "{e}");
    let e = MaskedMultiHeadAttention::new(MhaConfig::new(32, 4).with_dropout(1.0), vb(&vm))
        .unwrap_err();
    assert!(e.to_string().contains("dropout"), "{e}");
    let (l, _) = layer(&MhaConfig::new(32, 4), DType::F32, None);
    let x = tensor(&[2, 5, 32], 1).unwrap();
    let e = l
        .forward(
            &tensor(&[2, 5, 31], 1).unwrap(),
            &MhaOptions {
                keys: Some(&x),
                ..MhaOptions::new(&Mask::full())
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("d_model"), "{e}");
    let e = l
        .forward(
            &x,
            &MhaOptions {
                keys: Some(&tensor(&[3, 5, 32], 1).unwrap()),
                ..MhaOptions::new(&Mask::full())
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let e = l
        .forward(&x, &MhaOptions::new(&Mask::key_padding(vec![1, 2, 3])))
        .unwrap_err();
    assert!(e.to_string().contains("batch rows"), "{e}");
}

/// What the reference path and the weights cannot do is refused, naming what to pass
/// instead: a compiled mask (both need the mask itself) and dropout (the reference has none).
#[test]
fn the_reference_path_and_the_weights_refuse_what_they_cannot_compute() {
    let (l, _) = layer(&MhaConfig::new(32, 4).with_dropout(0.1), DType::F32, None);
    let x = tensor(&[2, 5, 32], 1).unwrap();
    let block = l.compile_mask(&Mask::causal(), 2, 5, 5).unwrap();
    let e = reference::mha_forward(&l, &x, &MhaOptions::new(&block)).unwrap_err();
    assert!(e.to_string().contains("not a block mask"), "{e}");
    let e = l
        .forward_with_weights(&x, &MhaOptions::new(&block))
        .unwrap_err();
    assert!(e.to_string().contains("not a block mask"), "{e}");
    let causal = Mask::causal();
    let train = MhaOptions {
        mode: Mode::Train { seed: 1 },
        ..MhaOptions::new(&causal)
    };
    let e = reference::mha_forward(&l, &x, &train).unwrap_err();
    assert!(e.to_string().contains("Mode::Eval"), "{e}");
    // In evaluation the two paths agree; the kernels take the compiled mask too.
    let plain = reference::mha_forward(&l, &x, &MhaOptions::new(&Mask::causal())).unwrap();
    let ours = l.forward(&x, &MhaOptions::new(&block)).unwrap();
    assert!(max_diff(&plain, &ours) < 1e-5);
    // And the layer with score modifiers is refused by the ready-tensor reference.
    let (m, _) = layer(&MhaConfig::new(32, 4).with_softcap(20.0), DType::F32, None);
    let keep = reference::dense_mask(
        &Mask::causal(),
        maskattn::MaskShape::new(2, 4, 5, 5),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = reference::mha_forward_with_keep(&m, &x, &x, &keep).unwrap_err();
    assert!(e.to_string().contains("score modifiers"), "{e}");
    let same = reference::mha_forward_with_keep(&l, &x, &x, &keep).unwrap();
    assert!(max_diff(&same, &plain) < 1e-6);
}
