//! The BERT encoder's matrix products all take the model path's f32 products
//! (`maskattn_candle::products`), so that `MASKATTN_ISA=avx2` / `set_isa` moves every one of
//! them — the feed-forward layers' included — and the encoder still agrees with an f64
//! BERT written with plain candle ops from the same weights. In a process of its own
//! because the instruction set is process-wide.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, D};
use common::tensor;
use maskattn::{set_isa, Isa};
use maskattn_candle::bert::{Bert, BertConfig};
use maskattn_candle::products::products_run;

const LAYERS: usize = 2;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const INTER: usize = 48;
const EPS: f64 = 1e-12;

/// Random weights under Hugging Face BERT names (layer norms random too, so a swapped
/// weight and bias shows).
fn weights() -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    let mut seed = 100;
    let mut put = |name: String, shape: &[usize], scale: f64, shift: f64| {
        seed += 1;
        let v = ((tensor(shape, seed).unwrap() * scale).unwrap() + shift).unwrap();
        t.insert(name, v);
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        &[30, HIDDEN],
        0.5,
        0.0,
    );
    put(
        "embeddings.position_embeddings.weight".into(),
        &[64, HIDDEN],
        0.5,
        0.0,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, HIDDEN],
        0.5,
        0.0,
    );
    let mut norms = vec!["embeddings.LayerNorm".to_string()];
    for i in 0..LAYERS {
        let l = format!("encoder.layer.{i}");
        for p in ["query", "key", "value"] {
            put(
                format!("{l}.attention.self.{p}.weight"),
                &[HIDDEN, HIDDEN],
                0.3,
                0.0,
            );
            put(format!("{l}.attention.self.{p}.bias"), &[HIDDEN], 0.1, 0.0);
        }
        put(
            format!("{l}.attention.output.dense.weight"),
            &[HIDDEN, HIDDEN],
            0.3,
            0.0,
        );
        put(
            format!("{l}.attention.output.dense.bias"),
            &[HIDDEN],
            0.1,
            0.0,
        );
        put(
            format!("{l}.intermediate.dense.weight"),
            &[INTER, HIDDEN],
            0.3,
            0.0,
        );
        put(format!("{l}.intermediate.dense.bias"), &[INTER], 0.1, 0.0);
        put(
            format!("{l}.output.dense.weight"),
            &[HIDDEN, INTER],
            0.3,
            0.0,
        );
        put(format!("{l}.output.dense.bias"), &[HIDDEN], 0.1, 0.0);
        norms.push(format!("{l}.attention.output.LayerNorm"));
        norms.push(format!("{l}.output.LayerNorm"));
    }
    for n in norms {
        put(format!("{n}.weight"), &[HIDDEN], 0.2, 1.0);
        put(format!("{n}.bias"), &[HIDDEN], 0.1, 0.0);
    }
    t
}

fn config() -> BertConfig {
    serde_json::from_str(&format!(
        r#"{{"vocab_size": 30, "hidden_size": {HIDDEN}, "num_hidden_layers": {LAYERS},
            "num_attention_heads": {HEADS}, "intermediate_size": {INTER},
            "max_position_embeddings": 64}}"#
    ))
    .unwrap()
}

/// BERT in f64 with candle's plain ops: embeddings, post-norm blocks of softmax attention
/// (padding keys masked out) and an exact-erf GELU feed-forward.
fn bert64(w: &HashMap<String, Tensor>, ids: &[Vec<u32>], lengths: &[usize]) -> Result<Tensor> {
    let g = |n: &str| w[n].to_dtype(DType::F64);
    let (b, l) = (ids.len(), ids[0].len());
    let dev = Device::Cpu;
    let flat: Vec<u32> = ids.concat();
    let ids = Tensor::from_vec(flat, (b * l,), &dev)?;
    let pos = Tensor::arange(0u32, l as u32, &dev)?;
    let word = g("embeddings.word_embeddings.weight")?.index_select(&ids, 0)?;
    let word = word.reshape((b, l, HIDDEN))?;
    let posv = g("embeddings.position_embeddings.weight")?.index_select(&pos, 0)?;
    let typ = g("embeddings.token_type_embeddings.weight")?.get(0)?;
    let x = word.broadcast_add(&posv)?.broadcast_add(&typ)?;
    let ln = |x: &Tensor, p: &str| -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + EPS)?.sqrt()?)?
            .broadcast_mul(&g(&format!("{p}.weight"))?)?
            .broadcast_add(&g(&format!("{p}.bias"))?)
    };
    let lin = |x: &Tensor, p: &str| -> Result<Tensor> {
        x.broadcast_matmul(&g(&format!("{p}.weight"))?.t()?)?
            .broadcast_add(&g(&format!("{p}.bias"))?)
    };
    // −∞ on padding keys, per row: [B, 1, 1, L].
    let bias: Vec<f64> = lengths
        .iter()
        .flat_map(|&n| (0..l).map(move |j| if j < n { 0.0 } else { f64::NEG_INFINITY }))
        .collect();
    let key_bias = Tensor::from_vec(bias, (b, 1, 1, l), &dev)?;
    let hd = HIDDEN / HEADS;
    let mut x = ln(&x, "embeddings.LayerNorm")?;
    for i in 0..LAYERS {
        let p = format!("encoder.layer.{i}");
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, HEADS, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(lin(&x, &format!("{p}.attention.self.query"))?)?;
        let k = split(lin(&x, &format!("{p}.attention.self.key"))?)?;
        let v = split(lin(&x, &format!("{p}.attention.self.value"))?)?;
        let s = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&key_bias)?;
        let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
        let a = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)?;
        let a = a.transpose(1, 2)?.reshape((b, l, HIDDEN))?;
        let a = lin(&a, &format!("{p}.attention.output.dense"))?;
        x = ln(&(x + a)?, &format!("{p}.attention.output.LayerNorm"))?;
        let h = lin(&x, &format!("{p}.intermediate.dense"))?.gelu_erf()?;
        let f = lin(&h, &format!("{p}.output.dense"))?;
        x = ln(&(x + f)?, &format!("{p}.output.LayerNorm"))?;
    }
    Ok(x)
}

#[test]
fn every_bert_product_runs_on_the_chosen_set_and_bert_agrees_with_f64() -> Result<()> {
    let w = weights();
    let bert = Bert::from_tensors(config(), w.clone(), &Device::Cpu)?;
    let (b, l) = (3, 20);
    let lengths = [20, 9, 1];
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|r| (0..l).map(|j| ((r * 7 + j * 3) % 30) as u32).collect())
        .collect();
    let gold = bert64(&w, &ids, &lengths)?;
    let t = Tensor::from_vec(ids.concat(), (b, l), &Device::Cpu)?;
    for isa in Isa::ALL {
        if set_isa(Some(isa)).is_err() {
            println!("{isa:?}: not on this CPU, skipped");
            continue;
        }
        let before = products_run(isa);
        let y = bert.forward(&t, &lengths)?;
        let ran = products_run(isa) - before;
        // q, k, v, o and the two feed-forward layers of every block.
        assert_eq!(
            ran,
            6 * LAYERS as u64,
            "{isa:?}: {ran} products on {isa:?}'s kernels, want 6 per layer"
        );
        // Only the rows' real tokens are compared (padding positions are not defined by BERT).
        let mut worst = 0f64;
        for (r, &n) in lengths.iter().enumerate() {
            let a = y.get(r)?.narrow(0, 0, n)?.to_dtype(DType::F64)?;
            let g = gold.get(r)?.narrow(0, 0, n)?;
            let d = (a - g)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            worst = worst.max(d);
        }
        // f32 through 2 layers of layer-normed activations of size ~1, with erf and exp
        // approximated within ~1e-6: a few 1e-5 at most; a wrong op shows at 1e-2 and up.
        assert!(worst < 1e-4, "{isa:?}: BERT differs from f64 by {worst:e}");
        println!("{isa:?}: 6 products per layer on its kernels; max |BERT − f64| = {worst:.2e}");
    }
    set_isa(None).unwrap();
    Ok(())
}
