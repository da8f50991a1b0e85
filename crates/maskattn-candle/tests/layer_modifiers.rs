//! The layer's score modifiers: soft-capping, ALiBi (fixed and trainable), sinks and T5
//! relative positions — saved and loaded with the weights, trained by autograd, the same in
//! the plain-ops reference, and in step-by-step decoding with the KV cache.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::{max_diff, tensor, to_f32_vec};
use maskattn::Mask;
use maskattn_candle::{
    reference, AlibiMode, KvCache, MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode,
};

fn configs() -> Vec<MhaConfig> {
    let base = || MhaConfig::new(32, 4).with_kv_heads(2);
    vec![
        base()
            .with_softcap(5.0)
            .with_alibi(AlibiMode::Trainable)
            .with_sinks()
            .with_rel(8, 16, true),
        base().with_alibi(AlibiMode::Fixed).with_rope(10_000.0),
        base().with_rel(6, 10, false).with_sinks(),
        base().with_softcap(1.5),
    ]
}

fn build(cfg: &MhaConfig, vm: &VarMap) -> MaskedMultiHeadAttention {
    MaskedMultiHeadAttention::new(
        cfg.clone(),
        VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu).pp("attn"),
    )
    .unwrap()
}

/// The modifier parameters a config asks for, by their names in the VarMap.
fn modifier_names(cfg: &MhaConfig) -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg.alibi == Some(AlibiMode::Trainable) {
        v.push("attn.alibi_slopes");
    }
    if cfg.sinks {
        v.push("attn.sinks");
    }
    if cfg.rel.is_some() {
        v.push("attn.rel_bias");
    }
    v
}

fn var(vm: &VarMap, name: &str) -> Tensor {
    vm.data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .as_tensor()
        .clone()
}

#[test]
fn trainable_modifiers_get_gradients_move_and_survive_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    for (n, cfg) in configs().into_iter().enumerate() {
        let vm = VarMap::new();
        let layer = build(&cfg, &vm);
        let names = modifier_names(&cfg);
        if cfg.alibi == Some(AlibiMode::Trainable) {
            // A fresh trainable ALiBi starts at the standard slopes.
            let got = to_f32_vec(&var(&vm, "attn.alibi_slopes")).unwrap();
            assert_eq!(got, maskattn::alibi_slopes(4), "config {n}");
        }
        let x = tensor(&[2, 19, 32], 1).unwrap();
        let mask = Mask::causal() & Mask::key_padding(vec![19, 12]);
        let before: Vec<Vec<f32>> = names
            .iter()
            .map(|m| to_f32_vec(&var(&vm, m)).unwrap())
            .collect();
        let y = layer
            .forward(
                &x,
                &MhaOptions {
                    mode: Mode::Train { seed: 3 },
                    ..MhaOptions::new(&mask)
                },
            )
            .unwrap();
        let loss = y.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for name in &names {
            let g = to_f32_vec(grads.get(&var(&vm, name)).expect("a gradient")).unwrap();
            assert!(g.iter().all(|x| x.is_finite()), "config {n} {name}: {g:?}");
            assert!(
                g.iter().any(|&x| x != 0.0),
                "config {n} {name}: zero gradient"
            );
        }
        let mut opt = AdamW::new(
            vm.all_vars(),
            ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads).unwrap();
        for (name, b) in names.iter().zip(&before) {
            let a = to_f32_vec(&var(&vm, name)).unwrap();
            assert_ne!(&a, b, "config {n} {name} did not move");
        }

        // Save, load into a fresh layer both ways, same output bit for bit.
        let path = dir.path().join(format!("layer{n}.safetensors"));
        vm.save(&path).unwrap();
        let want = to_f32_vec(&layer.forward(&x, &MhaOptions::new(&mask)).unwrap()).unwrap();
        let mut vm2 = VarMap::new();
        let loaded = build(&cfg, &vm2);
        vm2.load(&path).unwrap();
        let got = to_f32_vec(&loaded.forward(&x, &MhaOptions::new(&mask)).unwrap()).unwrap();
        assert_eq!(got, want, "config {n}: VarMap::load");
        // SAFETY: the file was just written by this test and is not changed while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap()
        };
        let mapped = MaskedMultiHeadAttention::new(cfg.clone(), vb.pp("attn")).unwrap();
        let got = to_f32_vec(&mapped.forward(&x, &MhaOptions::new(&mask)).unwrap()).unwrap();
        assert_eq!(got, want, "config {n}: from_mmaped_safetensors");
        eprintln!("config {n}: {names:?} trained, saved and loaded");
    }
}

#[test]
fn the_layer_with_modifiers_matches_its_plain_candle_ops_and_its_decoding() {
    for (n, cfg) in configs().into_iter().enumerate() {
        let vm = VarMap::new();
        let layer = build(&cfg, &vm);
        // Non-initial parameters: one training step.
        let x = tensor(&[2, 21, 32], 5).unwrap();
        let mut opt = AdamW::new(vm.all_vars(), ParamsAdamW::default()).unwrap();
        let loss = layer
            .forward(&x, &MhaOptions::new(&Mask::causal()))
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();

        for mask in [Mask::causal(), Mask::full(), Mask::window(5, 0)] {
            let ours = layer.forward(&x, &MhaOptions::new(&mask)).unwrap();
            let plain = reference::mha_forward(&layer, &x, &MhaOptions::new(&mask)).unwrap();
            let d = max_diff(&ours, &plain);
            assert!(
                d < 1e-5,
                "config {n} {mask:?}: kernels and candle ops differ by {d}"
            );
        }
        // Attention weights: the reference softmax of the modified scores.
        let (_, w) = layer
            .forward_with_weights(&x, &MhaOptions::new(&Mask::causal()))
            .unwrap();
        let sums = to_f32_vec(&w.sum(3).unwrap()).unwrap();
        let below_one = sums.iter().all(|&s| s < 1.0 + 1e-5 && s > 0.0);
        assert!(below_one, "config {n}: row sums {:?}", &sums[..4]);
        if cfg.sinks {
            assert!(
                sums.iter().all(|&s| s < 1.0 - 1e-6),
                "config {n}: a sink takes a share"
            );
        }

        let full = layer
            .forward(&x, &MhaOptions::new(&Mask::causal()))
            .unwrap();
        let mut cache = KvCache::new(4);
        let mut pos = 0;
        for step in [6, 1, 1, 5, 1, 7] {
            let got = layer
                .forward_step(&x.narrow(1, pos, step).unwrap(), &mut cache, None)
                .unwrap();
            let d = max_diff(&got, &full.narrow(1, pos, step).unwrap());
            assert!(
                d < 1e-5,
                "config {n}: decoding positions {pos}.. differ by {d}"
            );
            pos += step;
        }
        eprintln!("config {n}: kernels = candle ops = decoding");
    }
}

#[test]
fn bad_modifier_configs_are_errors() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    for (cfg, want) in [
        (MhaConfig::new(16, 2).with_softcap(0.0), "softcap"),
        (MhaConfig::new(16, 2).with_softcap(f32::NAN), "softcap"),
        (MhaConfig::new(16, 2).with_rel(0, 8, false), "num_buckets"),
    ] {
        let e = MaskedMultiHeadAttention::new(cfg, vb.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    // The defaults have no modifiers and no modifier parameters.
    let c = MhaConfig::new(16, 2);
    assert_eq!(
        (c.softcap, c.alibi, c.sinks, c.rel),
        (None, None, false, None)
    );
    let _ = MaskedMultiHeadAttention::new(c, vb.pp("plain")).unwrap();
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(
        names
            .iter()
            .all(|n| n.ends_with("weight") || n.ends_with("bias") && !n.contains("rel")),
        "{names:?}"
    );
}
