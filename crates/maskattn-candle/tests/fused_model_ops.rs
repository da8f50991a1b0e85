//! The fused ops of the model's training path — linear layer, head split (with rotary) and
//! merge, weighted cross-entropy: forward and the gradient of every input and parameter
//! against f64 formulas (the accuracy rule of docs/design.md section 4, with
//! the candle ops they replace as the f32 "naive" side) and against those ops directly;
//! the head merge is a pure copy, so it must give the ops' bits exactly.

mod common;

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};
use common::tensor;
use maskattn::reference;
use maskattn_candle::{fused, Rope};

fn vec1(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// The accuracy rule on slices: `fused` against the f64 `gold`, bounded by twice the error
/// of the candle ops (`ops`) plus 1e-5.
fn check(what: &str, fused: &[f32], gold: &[f64], ops: &[f32]) {
    let a = reference::accuracy(fused, gold, ops, reference::EPS_F32);
    assert!(a.ok, "{what}: {a:?}");
}

/// `y = x·Wᵀ + b` and, for the loss `Σ y·dy`, `(dx, dW, db)` in f64.
fn linear64(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    dy: &[f32],
    (inp, out): (usize, usize),
) -> [Vec<f64>; 4] {
    let rows = x.len() / inp;
    let (mut y, mut dx) = (vec![0f64; rows * out], vec![0f64; rows * inp]);
    let (mut dw, mut db) = (vec![0f64; out * inp], vec![0f64; out]);
    for r in 0..rows {
        for j in 0..out {
            let mut s = b.map_or(0.0, |b| b[j] as f64);
            for i in 0..inp {
                s += x[r * inp + i] as f64 * w[j * inp + i] as f64;
            }
            y[r * out + j] = s;
            let g = dy[r * out + j] as f64;
            db[j] += g;
            for i in 0..inp {
                dx[r * inp + i] += g * w[j * inp + i] as f64;
                dw[j * inp + i] += g * x[r * inp + i] as f64;
            }
        }
    }
    [y, dx, dw, db]
}

#[test]
fn linear_forward_and_every_gradient_against_f64_and_candle_linear() -> Result<()> {
    // One row; a 3-d input of odd sizes; 2048 rows of 128 → 512 (the model's MLP: gemm's
    // parallel path, many bias-gradient blocks); with and without a bias.
    for (lead, inp, out, bias) in [
        (vec![1], 5, 3, true),
        (vec![2, 7], 13, 9, true),
        (vec![3, 11], 16, 33, false),
        (vec![16, 128], 128, 512, true),
    ] {
        let mut xs = lead.clone();
        xs.push(inp);
        let mut ys = lead.clone();
        ys.push(out);
        let x = Var::from_tensor(&tensor(&xs, 1)?)?;
        let w = Var::from_tensor(&(tensor(&[out, inp], 2)? * 0.3)?)?;
        let b = Var::from_tensor(&tensor(&[out], 3)?)?;
        let dy = tensor(&ys, 4)?;
        let run = |fused_op: bool| -> Result<Vec<Vec<f32>>> {
            let bias = bias.then_some(b.as_tensor());
            let y = if fused_op {
                fused::linear(&x, &w, bias)?
            } else {
                fused::linear_ops(&x, &w, bias)?
            };
            assert_eq!(y.dims(), &ys[..]);
            let g = (&y * &dy)?.sum_all()?.backward()?;
            let mut res = vec![vec1(&y)];
            for v in [&x, &w, &b] {
                match g.get(v) {
                    Some(t) => res.push(vec1(t)),
                    None => res.push(vec![0.0; v.elem_count()]),
                }
            }
            Ok(res)
        };
        let (f, o) = (run(true)?, run(false)?);
        // The same gemm call as candle's matmul, the bias added after it: candle's bits —
        // where the products run on gemm, as candle's do (on OpenBLAS, `products.rs`, the
        // rule against f64 below still holds).
        let on_gemm = maskattn_candle::products::products_backend() == "gemm";
        assert!(
            !on_gemm || f[0] == o[0],
            "{lead:?}×{inp}→{out}: y is not candle's bits"
        );
        let bv = vec1(&b);
        let gold = linear64(
            &vec1(&x),
            &vec1(&w),
            bias.then_some(&bv[..]),
            &vec1(&dy),
            (inp, out),
        );
        let db_gold = if bias {
            gold[3].clone()
        } else {
            vec![0.0; out]
        };
        for (i, what) in ["y", "dx", "dW", "db"].iter().enumerate() {
            let g = if i == 3 { &db_gold } else { &gold[i] };
            check(&format!("{lead:?}×{inp}→{out} {what}"), &f[i], g, &o[i]);
        }
        println!(
            "fused linear {lead:?}×{inp}→{out} bias {bias}: y, dx, dW, db within the rule; \
             products on {}",
            maskattn_candle::products::products_backend()
        );
    }
    // A strided input (a transposed view) is read correctly.
    let x = tensor(&[6, 4], 5)?.t()?;
    let w = tensor(&[3, 6], 6)?;
    assert!(
        common::max_diff(
            &fused::linear(&x, &w, None)?,
            &fused::linear_ops(&x, &w, None)?
        ) < 1e-6
    );
    Ok(())
}

#[test]
fn linear_gradients_are_the_same_bits_for_any_number_of_threads() -> Result<()> {
    let x = Var::from_tensor(&tensor(&[700, 64], 7)?)?;
    let w = Var::from_tensor(&tensor(&[96, 64], 8)?)?;
    let b = Var::from_tensor(&tensor(&[96], 9)?)?;
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = fused::linear(&x, &w, Some(&b)).unwrap();
            let g = (&y * &y).unwrap().sum_all().unwrap().backward().unwrap();
            [&x, &w, &b].map(|v| {
                vec1(g.get(v).unwrap())
                    .iter()
                    .map(|f| f.to_bits())
                    .collect::<Vec<_>>()
            })
        })
    };
    let one = run(1);
    for t in [2, 3] {
        assert!(run(t) == one, "{t} threads");
    }
    Ok(())
}

/// `rotate_half` rotary of `x [B, L, H·d]` split into `[B, H, L, d]`, and the gradient for
/// the loss `Σ y·dy`, in f64 (angles from the same f32 tables the model uses).
fn split_rotary64(
    x: &[f32],
    dy: &[f32],
    (b, l, h, d): (usize, usize, usize, usize),
    t: &fused::RotaryTables,
) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let (mut y, mut dx) = (vec![0f64; x.len()], vec![0f64; x.len()]);
    for bi in 0..b {
        for hi in 0..h {
            for p in 0..l {
                let src = ((bi * l + p) * h + hi) * d;
                let dst = ((bi * h + hi) * l + p) * d;
                for j in 0..d {
                    let (c, s) = (t.cos[p * d + j] as f64, t.sin[p * d + j] as f64);
                    let (partner, sign) = if j < half {
                        (j + half, -1.0)
                    } else {
                        (j - half, 1.0)
                    };
                    y[dst + j] = x[src + j] as f64 * c + sign * x[src + partner] as f64 * s;
                    let g = dy[dst + j] as f64;
                    dx[src + j] += g * c;
                    dx[src + partner] += sign * g * s;
                }
            }
        }
    }
    (y, dx)
}

#[test]
fn split_heads_with_rotary_against_f64_and_the_candle_ops() -> Result<()> {
    // d = 2 (one pair), odd lengths and head counts, and the model's 4 heads of 32 over 512.
    for (b, l, h, d, offset) in [(1, 1, 1, 2, 0), (2, 13, 3, 6, 5), (2, 512, 4, 32, 0)] {
        let rope = Rope::new(d, 10_000.0);
        let x = Var::from_tensor(&(tensor(&[b, l, h * d], 11)? * 2.0)?)?;
        let dy = tensor(&[b, h, l, d], 12)?;
        let tables = Arc::new(rope.table_values(offset, l));
        let y = fused::split_heads(&x, h, Some(&tables))?;
        assert_eq!(y.dims(), &[b, h, l, d]);
        assert!(y.is_contiguous());
        let gf = (&y * &dy)?.sum_all()?.backward()?;
        let yo = rope.apply(&x.reshape((b, l, h, d))?.transpose(1, 2)?, offset)?;
        let go = (&yo * &dy)?.sum_all()?.backward()?;
        let (y64, dx64) = split_rotary64(&vec1(&x), &vec1(&dy), (b, l, h, d), &tables);
        check("rotary y", &vec1(&y), &y64, &vec1(&yo));
        let (dxf, dxo) = (vec1(gf.get(&x).unwrap()), vec1(go.get(&x).unwrap()));
        check("rotary dx", &dxf, &dx64, &dxo);
        println!(
            "fused split_heads + rotary [{b}, {l}, {h}·{d}] offset {offset}: y, dx within the rule"
        );
    }
    Ok(())
}

#[test]
fn split_and_merge_without_rotary_give_the_ops_bits() -> Result<()> {
    let (b, l, h, d) = (3, 17, 4, 8);
    let x = Var::from_tensor(&tensor(&[b, l, h * d], 21)?)?;
    let dy = tensor(&[b, h, l, d], 22)?;
    let y = fused::split_heads(&x, h, None)?;
    let yo = x.reshape((b, l, h, d))?.transpose(1, 2)?;
    assert_eq!(vec1(&y), vec1(&yo));
    let gf = (&y * &dy)?.sum_all()?.backward()?;
    let go = (&yo * &dy)?.sum_all()?.backward()?;
    assert_eq!(vec1(gf.get(&x).unwrap()), vec1(go.get(&x).unwrap()));

    let a = Var::from_tensor(&tensor(&[b, h, l, d], 23)?)?;
    let dz = tensor(&[b, l, h * d], 24)?;
    let z = fused::merge_heads(&a)?;
    let zo = a.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))?;
    assert_eq!(vec1(&z), vec1(&zo));
    let gf = (&z * &dz)?.sum_all()?.backward()?;
    let go = (&zo * &dz)?.sum_all()?.backward()?;
    assert_eq!(vec1(gf.get(&a).unwrap()), vec1(go.get(&a).unwrap()));
    println!("fused split_heads / merge_heads [{b}, {l}, {h}·{d}]: the ops' bits, both ways");
    Ok(())
}

/// `Σ w·nll` and its gradient in the logits, in f64.
fn nll64(x: &[f32], v: usize, targets: &[u32], weights: &[f32]) -> (f64, Vec<f64>) {
    let (mut total, mut dx) = (0f64, vec![0f64; x.len()]);
    for (n, row) in x.chunks(v).enumerate() {
        let m = row
            .iter()
            .map(|&a| a as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&a| (a as f64 - m).exp()).sum::<f64>().ln();
        let (t, w) = (targets[n] as usize, weights[n] as f64);
        total += w * (lse - row[t] as f64);
        for (j, &a) in row.iter().enumerate() {
            let p = (a as f64 - lse).exp();
            dx[n * v + j] = w * (p - if j == t { 1.0 } else { 0.0 });
        }
    }
    (total, dx)
}

#[test]
fn weighted_nll_and_its_gradient_against_f64_and_the_candle_ops() -> Result<()> {
    // One row of two classes; odd sizes; the model's 2048 rows of 259 (many blocks).
    for (lead, v) in [(vec![1], 2), (vec![3, 7], 11), (vec![16, 128], 259)] {
        let n: usize = lead.iter().product();
        let mut shape = lead.clone();
        shape.push(v);
        let x = Var::from_tensor(&(tensor(&shape, 31)? * 4.0)?)?;
        let data = common::data(n, 32);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
        // Weights 0, 1 and in between.
        let weights: Vec<f32> = data
            .iter()
            .map(|&d| {
                if d < -0.3 {
                    0.0
                } else if d < 0.4 {
                    1.0
                } else {
                    d
                }
            })
            .collect();
        let f = fused::weighted_nll(&x, &targets, &weights)?;
        let o = fused::weighted_nll_ops(&x, &targets, &weights)?;
        assert_eq!(f.dims(), o.dims());
        let (gf, go) = (f.backward()?, o.backward()?);
        let (l64, dx64) = nll64(&vec1(&x), v, &targets, &weights);
        check("nll", &vec1(&f), &[l64], &vec1(&o));
        check(
            "nll dx",
            &vec1(gf.get(&x).unwrap()),
            &dx64,
            &vec1(go.get(&x).unwrap()),
        );
        println!("fused weighted_nll {lead:?}×{v}: value and gradient within the rule");
    }
    // A target outside the classes is refused.
    let x = tensor(&[2, 3], 1)?;
    assert!(fused::weighted_nll(&x, &[0, 3], &[1.0, 1.0]).is_err());
    Ok(())
}

#[test]
fn weighted_nll_is_the_same_bits_for_any_number_of_threads() -> Result<()> {
    let x = Var::from_tensor(&(tensor(&[1000, 37], 41)? * 3.0)?)?;
    let targets: Vec<u32> = (0..1000).map(|i| (i * 5 % 37) as u32).collect();
    let weights = vec![1f32; 1000];
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let l = fused::weighted_nll(&x, &targets, &weights).unwrap();
            let g = l.backward().unwrap();
            let mut bits = vec![l.to_scalar::<f32>().unwrap().to_bits()];
            bits.extend(vec1(g.get(&x).unwrap()).iter().map(|f| f.to_bits()));
            bits
        })
    };
    let one = run(1);
    for t in [2, 3] {
        assert!(run(t) == one, "{t} threads");
    }
    Ok(())
}

#[test]
fn exp_stays_within_its_stated_relative_error() {
    use maskattn_candle::fused::approx;
    let mut worst = 0f64;
    // A dense grid of [−87, 88] and its ends.
    let xs = (-870_000..=880_000)
        .map(|i| i as f32 * 1e-4)
        .chain([-87.0, 0.0, 88.0]);
    for x in xs {
        let gold = (x as f64).exp();
        worst = worst.max((approx::exp(x) as f64 - gold).abs() / gold);
    }
    println!("approx::exp max relative error {worst:e} on [-87, 88]");
    assert!(worst <= approx::EXP_MAX_REL_ERR as f64, "{worst:e}");
    // And that good, not far better than stated.
    assert!(worst > 0.3 * approx::EXP_MAX_REL_ERR as f64, "{worst:e}");
    assert!(approx::exp(f32::NAN).is_nan());
    assert_eq!(approx::exp(0.0), 1.0);
}

#[test]
fn linear_gelu_gives_the_bits_of_linear_then_gelu() -> Result<()> {
    type Fused = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
    type Gelu = fn(&Tensor) -> Result<Tensor>;
    let forms: [(&str, Fused, Gelu); 2] = [
        ("tanh", fused::linear_gelu_tanh, fused::gelu_tanh),
        ("erf", fused::linear_gelu_erf, fused::gelu_erf),
    ];
    // Small (GELU on the calling thread), the LM's 2048 × 128 → 512 and a MiniLM
    // intermediate layer's 32 × 384 → 1536 (parallel).
    for (lead, inp, out) in [
        (vec![3, 5], 7, 11),
        (vec![16, 128], 128, 512),
        (vec![2, 16], 384, 1536),
    ] {
        let mut xs = lead.clone();
        xs.push(inp);
        let mut ys = lead.clone();
        ys.push(out);
        let x = Var::from_tensor(&(tensor(&xs, 51)? * 2.0)?)?;
        let w = Var::from_tensor(&tensor(&[out, inp], 52)?)?;
        let b = Var::from_tensor(&tensor(&[out], 53)?)?;
        let dy = tensor(&ys, 54)?;
        for (form, one, gelu) in forms {
            let run = |one_op: bool| -> Result<Vec<Vec<u32>>> {
                let y = if one_op {
                    one(&x, &w, &b)?
                } else {
                    gelu(&fused::linear(&x, &w, Some(&b))?)?
                };
                let g = (&y * &dy)?.sum_all()?.backward()?;
                let mut res = vec![vec1(&y)];
                for v in [&x, &w, &b] {
                    res.push(vec1(g.get(v).expect("every input gets a gradient")));
                }
                // +0 and −0 are the same gradient.
                Ok(res
                    .iter()
                    .map(|v| v.iter().map(|f| (f + 0.0).to_bits()).collect())
                    .collect())
            };
            let (f, o) = (run(true)?, run(false)?);
            for (i, what) in ["y", "dx", "dW", "db"].iter().enumerate() {
                assert!(
                    f[i] == o[i],
                    "{form} {lead:?}×{inp}→{out} {what}: not the same bits"
                );
            }
            println!(
                "fused linear_gelu_{form} {lead:?}×{inp}→{out}: the bits of linear + gelu_{form}"
            );
        }
    }
    Ok(())
}
