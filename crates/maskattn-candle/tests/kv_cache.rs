//! Decoding with the KV cache, one token (or a few) at a time, equals the full-sequence
//! forward under the causal mask.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use common::{max_diff, tensor};
use maskattn::Mask;
use maskattn_candle::{KvCache, MaskedMultiHeadAttention, MhaConfig, MhaOptions};

#[test]
fn step_by_step_decoding_equals_the_full_forward() {
    for (cfg, steps) in [
        (
            MhaConfig::new(32, 4).with_kv_heads(2).with_rope(10_000.0),
            vec![1usize; 20],
        ),
        (
            MhaConfig::new(32, 8).with_kv_heads(1),
            vec![5, 1, 1, 3, 1, 9],
        ),
        (
            MhaConfig::new(24, 3).with_rope(500.0).with_bias(false),
            vec![7, 2, 1, 1, 1],
        ),
    ] {
        let vm = VarMap::new();
        let layer = MaskedMultiHeadAttention::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let total: usize = steps.iter().sum();
        let x = tensor(&[2, total, cfg.d_model], 3).unwrap();
        let full = layer
            .forward(&x, &MhaOptions::new(&Mask::causal()))
            .unwrap();
        // A small chunk makes the cache grow several times on the way.
        let mut cache = KvCache::new(4);
        let mut pos = 0;
        for n in steps {
            let part = x.narrow(1, pos, n).unwrap();
            let got = layer.forward_step(&part, &mut cache, None).unwrap();
            let want = full.narrow(1, pos, n).unwrap();
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-5,
                "{cfg:?}: positions {pos}..{}: differ by {d}",
                pos + n
            );
            pos += n;
            assert_eq!(cache.len(), pos);
        }
    }
}

#[test]
fn a_padding_mask_carries_into_decoding() {
    let cfg = MhaConfig::new(16, 2);
    let vm = VarMap::new();
    let layer =
        MaskedMultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap();
    let x = tensor(&[2, 6, 16], 8).unwrap();
    // Batch row 1's prompt has 2 padding positions at the start (left padding).
    let keep = |lk: usize| -> Vec<bool> { (0..2 * lk).map(|i| !(i >= lk && i - lk < 2)).collect() };
    let full = layer
        .forward(
            &x,
            &MhaOptions::new(&(Mask::causal() & Mask::key_keep(keep(6), 2))),
        )
        .unwrap();
    let mut cache = KvCache::new(8);
    for pos in 0..6 {
        let got = layer
            .forward_step(
                &x.narrow(1, pos, 1).unwrap(),
                &mut cache,
                Some(&Mask::key_keep(keep(pos + 1), 2)),
            )
            .unwrap();
        let want = full.narrow(1, pos, 1).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "position {pos}");
    }
    // Row 1's first two positions see nothing: their attention output is 0, so the layer
    // returns the output projection's bias there.
    let o_bias = layer.projections()[3].bias().unwrap().clone();
    let first = full
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert!(max_diff(&first, &o_bias) < 1e-6);
}

/// Chunked attention (`causal & chunks(c)`, Llama 4's local layers) decodes step by step:
/// the chunk masks are bottom-right aligned, so a step's queries sit at the cache's end.
#[test]
fn chunked_attention_carries_into_decoding() {
    let cfg = MhaConfig::new(16, 4).with_kv_heads(2).with_rope(10_000.0);
    let vm = VarMap::new();
    let layer =
        MaskedMultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap();
    let x = tensor(&[2, 14, 16], 9).unwrap();
    let chunks = Mask::chunks(4);
    let full = layer
        .forward(&x, &MhaOptions::new(&(Mask::causal() & chunks.clone())))
        .unwrap();
    let mut cache = KvCache::new(8);
    let mut pos = 0;
    for n in [1usize, 2, 1, 3, 1, 4, 2] {
        let got = layer
            .forward_step(&x.narrow(1, pos, n).unwrap(), &mut cache, Some(&chunks))
            .unwrap();
        let want = full.narrow(1, pos, n).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "positions {pos}..{}", pos + n);
        pos += n;
    }
    // And the chunks matter: plain causal attention differs after the first chunk.
    let causal = layer
        .forward(&x, &MhaOptions::new(&Mask::causal()))
        .unwrap();
    assert!(
        max_diff(
            &causal.narrow(1, 4, 10).unwrap(),
            &full.narrow(1, 4, 10).unwrap()
        ) > 1e-3
    );
}
