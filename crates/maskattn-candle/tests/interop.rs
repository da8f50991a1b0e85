//! Weights move both ways: PyTorch nn.MultiheadAttention's own weights and outputs (a
//! fixture written by `fixtures/make_torch_mha.py`) are reproduced, and saving then loading
//! in every format gives the same layer.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{max_diff, tensor};
use maskattn::Mask;
use maskattn_candle::interop::{from_native, to_native};
use maskattn_candle::mask_convert::{from_torch_key_padding, from_torch_mha_attn_mask};
use maskattn_candle::{MaskedMultiHeadAttention, MhaConfig, MhaOptions, WeightFormat};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

#[test]
fn reproduces_pytorch_multihead_attention() {
    let t = fixture("torch_mha.safetensors");
    let layer = MaskedMultiHeadAttention::from_weights(
        MhaConfig::new(16, 4),
        &t,
        WeightFormat::TorchMha,
        &Device::Cpu,
    )
    .unwrap();
    let x = &t["x"];
    let pad = from_torch_key_padding(&t["key_padding_mask"]).unwrap();
    let out = layer.forward(x, &MhaOptions::new(&pad)).unwrap();
    let d = max_diff(&out, &t["out_pad"]);
    assert!(d < 1e-5, "key padding: differs from PyTorch by {d}");
    let causal = from_torch_mha_attn_mask(&t["attn_mask"], 4).unwrap();
    let out = layer.forward(x, &MhaOptions::new(&causal)).unwrap();
    let d = max_diff(&out, &t["out_causal"]);
    assert!(d < 1e-5, "causal: differs from PyTorch by {d}");
    // The same through our own vocabulary.
    let out = layer.forward(x, &MhaOptions::new(&Mask::causal())).unwrap();
    assert!(max_diff(&out, &t["out_causal"]) < 1e-5);
}

#[test]
fn reproduces_pytorch_cross_attention_with_other_key_and_value_sizes() {
    let t = fixture("torch_mha_cross.safetensors");
    let cfg = MhaConfig::new(16, 4).with_kdim_vdim(12, 10);
    let layer =
        MaskedMultiHeadAttention::from_weights(cfg, &t, WeightFormat::TorchMha, &Device::Cpu)
            .unwrap();
    let pad = from_torch_key_padding(&t["key_padding_mask"]).unwrap();
    let out = layer
        .forward(
            &t["x"],
            &MhaOptions {
                keys: Some(&t["key"]),
                values: Some(&t["value"]),
                ..MhaOptions::new(&pad)
            },
        )
        .unwrap();
    let d = max_diff(&out, &t["out_pad"]);
    assert!(d < 1e-5, "differs from PyTorch by {d}");
}

#[test]
fn save_and_load_round_trip_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MhaConfig::new(24, 3);
    let vm = VarMap::new();
    let layer = MaskedMultiHeadAttention::new(
        cfg.clone(),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = tensor(&[2, 6, 24], 1).unwrap();
    let want = layer
        .forward(&x, &MhaOptions::new(&Mask::causal()))
        .unwrap();
    let formats = [
        WeightFormat::Native,
        WeightFormat::TorchMha,
        WeightFormat::Bert {
            prefix: "encoder.layer.3.attention",
        },
    ];
    for (i, f) in formats.into_iter().enumerate() {
        let path = dir.path().join(format!("w{i}.safetensors"));
        layer.save(&path, f).unwrap();
        let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        if let WeightFormat::Bert { prefix } = f {
            assert!(saved.contains_key(&format!("{prefix}.self.query.weight")));
            assert!(saved.contains_key(&format!("{prefix}.output.dense.bias")));
        }
        if f == WeightFormat::TorchMha {
            assert_eq!(saved["in_proj_weight"].dims(), &[72, 24]);
        }
        let back = MaskedMultiHeadAttention::load(cfg.clone(), &path, f, &Device::Cpu).unwrap();
        let got = back.forward(&x, &MhaOptions::new(&Mask::causal())).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0, "{f:?}");
        // And the names convert both ways without loss.
        let native = to_native(&saved, f, &cfg).unwrap();
        let again = from_native(&native, f, &cfg).unwrap();
        assert_eq!(again.len(), saved.len());
        for (k, v) in &saved {
            assert_eq!(max_diff(v, &again[k]), 0.0, "{f:?} {k}");
        }
    }
    assert!(!dir.path().join("w0.safetensors.tmp").exists());
}

#[test]
fn missing_or_misshapen_weights_are_clear_errors() {
    let t = fixture("torch_mha.safetensors");
    let mut broken = t.clone();
    broken.remove("out_proj.weight");
    let e = MaskedMultiHeadAttention::from_weights(
        MhaConfig::new(16, 4),
        &broken,
        WeightFormat::TorchMha,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("`out_proj.weight` is missing"),
        "{e}"
    );
    // A config that does not match the weights' shapes.
    assert!(MaskedMultiHeadAttention::from_weights(
        MhaConfig::new(32, 4),
        &t,
        WeightFormat::TorchMha,
        &Device::Cpu
    )
    .is_err());
    // GQA has no nn.MultiheadAttention equivalent.
    let e = MaskedMultiHeadAttention::from_weights(
        MhaConfig::new(16, 4).with_kv_heads(2),
        &t,
        WeightFormat::TorchMha,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("num_kv_heads"), "{e}");
    let e = MaskedMultiHeadAttention::load(
        MhaConfig::new(16, 4),
        "/nonexistent.safetensors",
        WeightFormat::Native,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("reading"), "{e}");
}
