//! Conversions from other conventions, each checked pair by pair against the convention's
//! own definition, and through the layer against our vocabulary.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::tensor;
use maskattn::{Mask, MaskShape};
use maskattn_candle::mask_convert::*;
use maskattn_candle::{MaskedMultiHeadAttention, MhaConfig, MhaOptions};

fn allowed(m: &Mask, s: MaskShape) -> Vec<bool> {
    m.validate(&s).unwrap();
    let mut v = vec![];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.lq {
                for j in 0..s.lk {
                    v.push(m.allowed(&s, b, h, i, j));
                }
            }
        }
    }
    v
}

fn u8t(v: &[u8], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

#[test]
fn torch_key_padding_true_means_ignore() {
    // Row 0 ignores its last key, row 1 its first two.
    let m = from_torch_key_padding(&u8t(&[0, 0, 1, 1, 1, 0], &[2, 3])).unwrap();
    let s = MaskShape::new(2, 1, 1, 3);
    assert_eq!(allowed(&m, s), vec![true, true, false, false, false, true]);
}

#[test]
fn hf_attention_mask_one_means_real_token() {
    let m = from_hf_attention_mask(&u8t(&[1, 1, 0, 0, 1, 1], &[2, 3])).unwrap();
    assert_eq!(
        allowed(&m, MaskShape::new(2, 1, 1, 3)),
        vec![true, true, false, false, true, true]
    );
}

#[test]
fn torch_mha_attn_mask_true_means_not_allowed_and_sdpa_the_opposite() {
    // A causal pattern written in both PyTorch conventions.
    let upper: Vec<u8> = (0..9).map(|x| (x % 3 > x / 3) as u8).collect(); // true above the diagonal
    let lower: Vec<u8> = upper.iter().map(|&x| 1 - x).collect();
    let s = MaskShape::new(1, 2, 3, 3);
    let want = allowed(&Mask::causal(), s);
    assert_eq!(
        allowed(
            &from_torch_mha_attn_mask(&u8t(&upper, &[3, 3]), 2).unwrap(),
            s
        ),
        want
    );
    assert_eq!(
        allowed(&from_sdpa_bool_mask(&u8t(&lower, &[3, 3])).unwrap(), s),
        want
    );
    // [B·H, L_q, L_k]: head 1 of batch row 0 hides everything.
    let mut per_head = upper.clone();
    per_head.extend(vec![1u8; 9]);
    let m = from_torch_mha_attn_mask(&u8t(&per_head, &[2, 3, 3]), 2).unwrap();
    let got = allowed(&m, s);
    assert_eq!(&got[..9], &want[..9]);
    assert!(got[9..].iter().all(|&x| !x));
    assert!(from_torch_mha_attn_mask(&u8t(&per_head, &[2, 3, 3]), 4).is_err());
}

#[test]
fn candle_u8_one_means_masked() {
    let m = from_candle_u8(&u8t(&[0, 1, 0, 0], &[2, 2])).unwrap();
    assert_eq!(
        allowed(&m, MaskShape::new(1, 1, 2, 2)),
        vec![true, false, true, true]
    );
}

#[test]
fn additive_masks_zero_visible_min_hidden_other_values_rejected() {
    let t = Tensor::new(&[[0f32, f32::MIN], [f32::NEG_INFINITY, 0.0]], &Device::Cpu).unwrap();
    let m = from_additive(&t).unwrap();
    assert_eq!(
        allowed(&m, MaskShape::new(1, 1, 2, 2)),
        vec![true, false, false, true]
    );
    let bias = Tensor::new(&[[0f32, -2.5]], &Device::Cpu).unwrap();
    let e = from_additive(&bias).unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
    let e = from_candle_u8(&u8t(&[0; 5], &[5])).unwrap_err();
    assert!(e.to_string().contains("rank"), "{e}");
}

#[test]
fn converted_masks_give_the_same_layer_output_as_our_vocabulary() {
    let vm = VarMap::new();
    let layer = MaskedMultiHeadAttention::new(
        MhaConfig::new(16, 2),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = tensor(&[2, 5, 16], 4).unwrap();
    let ours = layer
        .forward(&x, &MhaOptions::new(&Mask::key_padding(vec![5, 3])))
        .unwrap();
    let ignore = u8t(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 1], &[2, 5]);
    let theirs = layer
        .forward(
            &x,
            &MhaOptions::new(&from_torch_key_padding(&ignore).unwrap()),
        )
        .unwrap();
    assert_eq!(common::max_diff(&ours, &theirs), 0.0);
}
