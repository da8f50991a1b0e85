//! The fused ops: the erf / tanh approximations within their stated maximum errors against
//! f64 (dense grid and special values), GELU and layer norm forward and backward against f64
//! formulas and against the candle ops they replace, gradients reaching input, weight and
//! bias, the same bits for any number of threads, and every parameter of `TinyLm` still
//! receiving a gradient.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::tensor;
use maskattn::Mask;
use maskattn_candle::fused::{self, approx};
use maskattn_candle::model::{LmConfig, Positions, TinyLm};
use maskattn_candle::Mode;

/// erf in f64: its Taylor series for |x| ≤ 3 (terms below 170, so rounding stays near
/// 1e-14), the continued fraction of erfc beyond.
fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let v = if a <= 3.0 {
        let (mut term, mut sum) = (a, a);
        for n in 1..200 {
            term *= -a * a / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = e^(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + …)))), evaluated bottom-up.
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    v.copysign(x)
}

/// A dense grid of [−10, 10], the extremes and the points where the fits change behaviour.
fn grid() -> Vec<f32> {
    let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-5).collect();
    xs.extend([
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        3.9999,
        4.0,
        4.0001,
        7.905,
        7.906,
        30.0,
        -30.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
    ]);
    xs
}

#[test]
fn erf_and_tanh_stay_within_their_stated_errors() {
    // The reference itself, at known values.
    assert!((erf64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
    assert!((erf64(3.5) - 0.999_999_256_901_627_7).abs() < 1e-15);
    let (mut e_erf, mut e_tanh) = (0f64, 0f64);
    for x in grid() {
        let xd = x as f64;
        e_erf = e_erf.max((approx::erf(x) as f64 - erf64(xd)).abs());
        e_tanh = e_tanh.max((approx::tanh(x) as f64 - xd.tanh()).abs());
    }
    assert!(
        e_erf <= approx::ERF_MAX_ERR as f64,
        "erf max error {e_erf:e}"
    );
    assert!(
        e_tanh <= approx::TANH_MAX_ERR as f64,
        "tanh max error {e_tanh:e}"
    );
    // And the fits are that good, not far better than stated (the constants say what is true).
    assert!(e_erf > 1e-7 && e_tanh > 1e-7, "{e_erf:e} {e_tanh:e}");
    assert!(approx::erf(f32::NAN).is_nan() && approx::tanh(f32::NAN).is_nan());
    assert_eq!(approx::erf(0.0), 0.0);
    assert_eq!(approx::tanh(0.0), 0.0);
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gelu_forward_and_backward_against_f64() -> Result<()> {
    let xs: Vec<f32> = (-80_000..=80_000).map(|i| i as f32 * 1e-4).collect();
    let n = xs.len();
    let x = Var::from_vec(xs.clone(), n, &Device::Cpu)?;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    for form in ["erf", "tanh"] {
        let y = match form {
            "erf" => fused::gelu_erf(&x)?,
            _ => fused::gelu_tanh(&x)?,
        };
        // Σ y·w with w = 1 + x/8 makes the incoming gradient differ element by element.
        let w = ((x.as_tensor() / 8.0)? + 1.0)?.detach();
        let g = (&y * &w)?.sum_all()?.backward()?;
        let (yv, dv) = (vec1(&y), vec1(g.get(&x).expect("gradient")));
        let (mut ey, mut ed) = (0f64, 0f64);
        for i in 0..n {
            let xd = xs[i] as f64;
            let (f, df) = match form {
                "erf" => {
                    let cdf = 0.5 * (1.0 + erf64(xd / 2f64.sqrt()));
                    let pdf = (-xd * xd / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    (xd * cdf, cdf + xd * pdf)
                }
                _ => {
                    let u = c * (xd + 0.044715 * xd.powi(3));
                    let t = u.tanh();
                    let du = c * (1.0 + 3.0 * 0.044715 * xd * xd);
                    (
                        0.5 * xd * (1.0 + t),
                        0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * du,
                    )
                }
            };
            let scale = xd.abs().max(1.0);
            ey = ey.max((yv[i] as f64 - f).abs() / scale);
            ed = ed.max((dv[i] as f64 - df * (1.0 + xd / 8.0)).abs() / scale);
        }
        // The approximation's error times |x|/2, plus f32 rounding of the formula.
        assert!(ey < 1.5e-6, "{form}: forward error {ey:e}");
        assert!(ed < 2e-6, "{form}: backward error {ed:e}");
    }
    Ok(())
}

#[test]
fn gelu_matches_the_candle_ops_it_replaces() -> Result<()> {
    // Large enough (300 k elements) to take the parallel path, and a small one that does not.
    for shape in [vec![3, 100, 1000], vec![7, 13]] {
        let x = (tensor(&shape, 4)? * 6.0)?;
        let d = |a: &Tensor, b: &Tensor| common::max_diff(a, b);
        assert!(d(&fused::gelu_erf(&x)?, &x.gelu_erf()?) < 2e-6);
        assert!(d(&fused::gelu_tanh(&x)?, &x.gelu()?) < 2e-6);
        // The tanh form's gradient against candle's own backward of `gelu`, whose constants
        // have six digits (0.797885, 0.0356774, …): it is the less accurate of the two, and
        // `gelu_forward_and_backward_against_f64` holds ours to the f64 derivative.
        let v = Var::from_tensor(&x)?;
        let ga = fused::gelu_tanh(&v)?.sum_all()?.backward()?;
        let gb = v.as_tensor().gelu()?.sum_all()?.backward()?;
        let e = d(ga.get(&v).unwrap(), gb.get(&v).unwrap());
        assert!(e < 5e-5, "{e:e}");
    }
    // Other dtypes fall back to candle's ops, and a strided input is read correctly.
    let x = tensor(&[4, 6], 5)?;
    let h = x.to_dtype(DType::BF16)?;
    assert_eq!(fused::gelu_erf(&h)?.dtype(), DType::BF16);
    let t = x.t()?;
    assert!(common::max_diff(&fused::gelu_erf(&t)?, &t.gelu_erf()?) < 2e-6);
    Ok(())
}

/// Layer norm in f64 and its gradients for `Σ y·dy`.
fn layer_norm64(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = w.len();
    let (mut y, mut dx) = (vec![], vec![]);
    let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
    for (xr, gr) in x.chunks(n).zip(dy.chunks(n)) {
        let xr: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
        let mean = xr.iter().sum::<f64>() / n as f64;
        let var = xr.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let r = 1.0 / (var + eps).sqrt();
        let xh: Vec<f64> = xr.iter().map(|v| (v - mean) * r).collect();
        let g: Vec<f64> = (0..n).map(|i| gr[i] as f64 * w[i] as f64).collect();
        let mg = g.iter().sum::<f64>() / n as f64;
        let mgx = (0..n).map(|i| g[i] * xh[i]).sum::<f64>() / n as f64;
        for i in 0..n {
            y.push(xh[i] * w[i] as f64 + b[i] as f64);
            dx.push(r * (g[i] - mg - xh[i] * mgx));
            dw[i] += gr[i] as f64 * xh[i];
            db[i] += gr[i] as f64;
        }
    }
    (y, dx, dw, db)
}

fn max_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
}

#[test]
fn layer_norm_forward_and_every_gradient_against_f64_and_the_candle_ops() -> Result<()> {
    // 1 row, a few rows, and 300 rows of 384 (the parallel path, several gradient blocks).
    for (rows, n, eps) in [(1, 5, 1e-5), (9, 32, 1e-12), (300, 384, 1e-12)] {
        let x = Var::from_tensor(&((tensor(&[rows, n], 1)? * 3.0)? + 0.5)?)?;
        let w = Var::from_tensor(&(tensor(&[n], 2)? + 1.0)?)?;
        let b = Var::from_tensor(&tensor(&[n], 3)?)?;
        let dy = tensor(&[rows, n], 4)?;
        let run = |fused_op: bool| -> Result<Vec<Vec<f32>>> {
            let y = if fused_op {
                fused::layer_norm(&x, &w, &b, eps)?
            } else {
                fused::layer_norm_ops(&x, &w, &b, eps)?
            };
            let g = (&y * &dy)?.sum_all()?.backward()?;
            let mut out = vec![vec1(&y)];
            for v in [&x, &w, &b] {
                out.push(vec1(g.get(v).expect("every input gets a gradient")));
            }
            Ok(out)
        };
        let (f, o) = (run(true)?, run(false)?);
        let (y64, dx64, dw64, db64) =
            layer_norm64(&vec1(&x), &vec1(&w), &vec1(&b), &vec1(&dy), eps);
        for (i, (what, gold)) in [("y", &y64), ("dx", &dx64), ("dw", &dw64), ("db", &db64)]
            .into_iter()
            .enumerate()
        {
            // The accuracy rule: within twice the composed f32 ops' error, plus 1e-5.
            let (ef, eo) = (max_err(&f[i], gold), max_err(&o[i], gold));
            assert!(
                ef <= 2.0 * eo + 1e-5,
                "{rows}x{n} {what}: fused {ef:e}, ops {eo:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn layer_norm_gradients_are_the_same_bits_for_any_number_of_threads() -> Result<()> {
    let x = Var::from_tensor(&tensor(&[513, 128], 7)?)?;
    let w = Var::from_tensor(&tensor(&[128], 8)?)?;
    let b = Var::from_tensor(&tensor(&[128], 9)?)?;
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = fused::layer_norm(&x, &w, &b, 1e-5).unwrap();
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

#[test]
fn every_tiny_lm_parameter_gets_a_gradient_through_the_fused_ops() -> Result<()> {
    let vars = VarMap::new();
    let cfg = LmConfig {
        vocab: 13,
        d_model: 32,
        layers: 2,
        heads: 4,
        kv_heads: 4,
        d_ff: 64,
        max_len: 32,
        positions: Positions::Learned,
        dropout: 0.0,
        softcap: None,
        sinks: false,
    };
    let lm = TinyLm::new(
        cfg,
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )?;
    let ids: Vec<u32> = (0..2 * 20).map(|i| (i * 5 + 1) % 13).collect();
    let t = Tensor::from_vec(ids, (2, 20), &Device::Cpu)?;
    let logits = lm.forward(&t, &Mask::causal(), Mode::Train { seed: 1 })?;
    let g = (&logits * tensor(&[2, 20, 13], 3)?)?
        .sum_all()?
        .backward()?;
    let data = vars.data().lock().unwrap();
    let names: Vec<&String> = data.keys().collect();
    assert!(names.iter().any(|n| n.contains("ln1")) && names.iter().any(|n| n.contains("fc1")));
    for (name, v) in data.iter() {
        let gv = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let nonzero = gv.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(nonzero > 0.0, "{name}: gradient is all zero");
    }
    Ok(())
}
