//! A block mask compiled once per model call: the layer, `TinyLm` and `Bert` give the same
//! bits (outputs and every gradient) from a compiled `BlockMask` as from the `&Mask` it was
//! compiled from, and refuse, with a message that says so, a block mask of another shape.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::tensor;
use maskattn::Mask;
use maskattn_candle::bert::{Bert, BertConfig};
use maskattn_candle::model::{LmConfig, Positions, TinyLm};
use maskattn_candle::{MaskedMultiHeadAttention, MhaConfig, MhaOptions, Mode};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Every gradient of `loss` with respect to `vars` (by name) and to `extra`, as bits.
fn grad_bits(loss: &Tensor, vars: &VarMap, extra: &[&Tensor]) -> Vec<(String, Vec<u32>)> {
    let g = loss.backward().unwrap();
    let data = vars.data().lock().unwrap();
    let mut out: Vec<(String, Vec<u32>)> = data
        .iter()
        .map(|(name, v)| {
            let gv = g
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            (name.clone(), bits(gv))
        })
        .collect();
    for (i, t) in extra.iter().enumerate() {
        out.push((
            format!("input {i}"),
            bits(g.get(t).expect("input gradient")),
        ));
    }
    out.sort();
    out
}

#[test]
fn layer_with_a_compiled_mask_gives_the_same_bits_as_with_the_mask() -> Result<()> {
    let vars = VarMap::new();
    // GQA, rotary positions and dropout: every path of the layer that reads the mask.
    let cfg = MhaConfig::new(32, 4)
        .with_kv_heads(2)
        .with_rope(10_000.0)
        .with_dropout(0.2);
    let attn = MaskedMultiHeadAttention::new(
        cfg,
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )?;
    let x = Var::from_tensor(&tensor(&[3, 70, 32], 1)?)?;
    let dout = tensor(&[3, 70, 32], 2)?;
    let mask = Mask::causal() & Mask::key_padding(vec![70, 41, 9]);
    let mode = Mode::Train { seed: 7 };

    let a = attn.forward(
        &x,
        &MhaOptions {
            mode,
            ..MhaOptions::new(&mask)
        },
    )?;
    let ga = grad_bits(&(&a * &dout)?.sum_all()?, &vars, &[x.as_tensor()]);
    let block = attn.compile_mask(&mask, 3, 70, 70)?;
    let b = attn.forward(
        &x,
        &MhaOptions {
            mode,
            ..MhaOptions::new(&block)
        },
    )?;
    let gb = grad_bits(&(&b * &dout)?.sum_all()?, &vars, &[x.as_tensor()]);

    assert_eq!(bits(&a), bits(&b), "outputs");
    assert_eq!(ga.len(), 9, "8 parameters and the input");
    assert_eq!(ga, gb, "gradients");
    // The block mask is reused, not consumed: a second call gives the same bits again.
    let c = attn.forward(
        &x,
        &MhaOptions {
            mode,
            ..MhaOptions::new(&block)
        },
    )?;
    assert_eq!(bits(&a), bits(&c));
    Ok(())
}

#[test]
fn layer_refuses_a_block_mask_of_another_shape() -> Result<()> {
    let vars = VarMap::new();
    let attn = MaskedMultiHeadAttention::new(
        MhaConfig::new(16, 2),
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )?;
    let x = tensor(&[2, 10, 16], 3)?;
    let mask = Mask::causal();
    for (b, l, what) in [(1, 10, "batch"), (2, 11, "length")] {
        let block = attn.compile_mask(&mask, b, l, l)?;
        let err = attn
            .forward(&x, &MhaOptions::new(&block))
            .expect_err(what)
            .to_string();
        assert!(
            err.contains(&format!("compiled for [B {b}, H 2, L_q {l}, L_k {l}]"))
                && err.contains("this call is [B 2, H 2, L_q 10, L_k 10]"),
            "{what}: {err}"
        );
    }
    // Compiled for one head where the layer has two (a mask compiled by hand).
    let one_head = std::sync::Arc::new(
        maskattn::BlockMask::new(&mask, maskattn::MaskShape::new(2, 1, 10, 10)).unwrap(),
    );
    let err = attn
        .forward(&x, &MhaOptions::new(&one_head))
        .expect_err("heads")
        .to_string();
    assert!(err.contains("compiled for [B 2, H 1,"), "{err}");
    Ok(())
}

fn tiny_lm(vars: &VarMap) -> Result<TinyLm> {
    let cfg = LmConfig {
        vocab: 11,
        d_model: 32,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        d_ff: 64,
        max_len: 64,
        positions: Positions::Rotary,
        dropout: 0.1,
        softcap: None,
        sinks: false,
    };
    TinyLm::new(cfg, VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu))
}

fn tokens(b: usize, l: usize, vocab: u32) -> Result<Tensor> {
    let ids: Vec<u32> = (0..b * l).map(|i| (i as u32 * 7 + 3) % vocab).collect();
    Tensor::from_vec(ids, (b, l), &Device::Cpu)
}

#[test]
fn tiny_lm_with_a_compiled_mask_gives_the_same_bits_as_with_the_mask() -> Result<()> {
    let vars = VarMap::new();
    let lm = tiny_lm(&vars)?;
    let t = tokens(2, 40, 11)?;
    let mask =
        Mask::causal() & Mask::documents([vec![0i64; 40], vec![0; 13], vec![1; 27]].concat(), 2);
    let mode = Mode::Train { seed: 99 };
    let w = tensor(&[2, 40, 11], 5)?;

    let a = lm.forward(&t, &mask, mode)?;
    let ga = grad_bits(&(&a * &w)?.sum_all()?, &vars, &[]);
    let block = lm.compile_mask(&mask, 2, 40)?;
    let b = lm.forward_with_block(&t, &block, mode)?;
    let gb = grad_bits(&(&b * &w)?.sum_all()?, &vars, &[]);
    assert_eq!(bits(&a), bits(&b), "logits");
    assert_eq!(ga, gb, "gradients");

    let wrong = lm.compile_mask(&Mask::causal(), 2, 39)?;
    let err = lm
        .forward_with_block(&t, &wrong, mode)
        .expect_err("length")
        .to_string();
    assert!(
        err.contains("compiled for [B 2, H 4, L_q 39, L_k 39]"),
        "{err}"
    );
    Ok(())
}

/// A BERT of random weights under Hugging Face names: 2 layers, hidden 32, 4 heads.
fn tiny_bert() -> Result<Bert> {
    let cfg: BertConfig = serde_json::from_str(
        r#"{"vocab_size": 30, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64}"#,
    )
    .unwrap();
    let mut t = HashMap::new();
    let mut seed = 10;
    let mut put = |name: String, shape: &[usize]| {
        seed += 1;
        t.insert(name, (tensor(shape, seed).unwrap() * 0.3).unwrap());
    };
    put("embeddings.word_embeddings.weight".into(), &[30, 32]);
    put("embeddings.position_embeddings.weight".into(), &[64, 32]);
    put("embeddings.token_type_embeddings.weight".into(), &[2, 32]);
    let norm = |t: &mut HashMap<String, Tensor>, p: String| {
        t.insert(
            format!("{p}.weight"),
            Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{p}.bias"),
            Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
        );
    };
    let mut names = vec![];
    for i in 0..2 {
        let l = format!("encoder.layer.{i}");
        for p in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            names.push((format!("{l}.{p}"), 32, 32));
        }
        names.push((format!("{l}.intermediate.dense"), 48, 32));
        names.push((format!("{l}.output.dense"), 32, 48));
    }
    for (n, o, i) in names {
        put(format!("{n}.weight"), &[o, i]);
        put(format!("{n}.bias"), &[o]);
    }
    norm(&mut t, "embeddings.LayerNorm".into());
    for i in 0..2 {
        norm(
            &mut t,
            format!("encoder.layer.{i}.attention.output.LayerNorm"),
        );
        norm(&mut t, format!("encoder.layer.{i}.output.LayerNorm"));
    }
    Bert::from_tensors(cfg, t, &Device::Cpu)
}

#[test]
fn bert_with_a_compiled_mask_gives_the_same_bits_as_with_the_lengths() -> Result<()> {
    let bert = tiny_bert()?;
    let ids = tokens(3, 20, 30)?;
    let lengths = [20, 7, 1];
    let a = bert.forward(&ids, &lengths)?;
    let block = bert.compile_mask(&Mask::key_padding(lengths.to_vec()), 3, 20)?;
    let b = bert.forward_with_block(&ids, &block)?;
    assert_eq!(bits(&a), bits(&b));

    let wrong = bert.compile_mask(&Mask::key_padding(lengths.to_vec()), 3, 21)?;
    let err = bert
        .forward_with_block(&ids, &wrong)
        .expect_err("length")
        .to_string();
    assert!(
        err.contains("compiled for [B 3, H 4, L_q 21, L_k 21]"),
        "{err}"
    );
    Ok(())
}
