//! Gradients against central finite differences of the f64 reference forward, on tiny
//! shapes: first the reference's own analytic gradients (the oracle must be right), then
//! the kernel's.

mod common;

use common::{random_case, Case};
use maskattn::{reference, View};

/// loss = Σ dout · out, evaluated by the f64 reference with one input replaced.
fn loss(c: &Case, which: usize, data: &[f32]) -> f64 {
    let mut c2 = c.clone();
    match which {
        0 => c2.q = data.to_vec(),
        1 => c2.k = data.to_vec(),
        _ => c2.v = data.to_vec(),
    }
    let (q, k, v) = c2.views();
    let out = reference::forward::<f64>(&q, &k, &v, &c2.mask, &c2.params())
        .unwrap()
        .out;
    let dout = common::to_bhld(&c2.dout_view());
    out.iter().zip(&dout).map(|(o, g)| o * *g as f64).sum()
}

/// Finite-difference gradient of one input, in that input's storage order.
fn numeric(c: &Case, which: usize) -> Vec<f64> {
    let base = [&c.q, &c.k, &c.v][which].clone();
    let h = 1e-3f32; // exactly representable steps keep f32 inputs exact
    (0..base.len())
        .map(|idx| {
            let mut plus = base.clone();
            let mut minus = base.clone();
            plus[idx] += h;
            minus[idx] -= h;
            let (p, m) = (plus[idx] as f64, minus[idx] as f64);
            (loss(c, which, &plus) - loss(c, which, &minus)) / (p - m)
        })
        .collect()
}

/// Reorders a gradient from `[B, H, L, d]` into the input's own layout.
fn to_layout(c: &Case, which: usize, grad: &[f32]) -> Vec<f64> {
    let shape = if which == 0 {
        c.q_shape()
    } else {
        c.kv_shape()
    };
    let layout = c.layouts[which];
    let zeros = vec![0f32; grad.len()];
    let [b, h, l, d] = shape;
    let view = common::view("g", &zeros, shape, layout);
    let strides = view.strides();
    let mut out = vec![0f64; grad.len()];
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                for x in 0..d {
                    let src = ((bi * h + hi) * l + li) * d + x;
                    let dst = bi * strides[0] + hi * strides[1] + li * strides[2] + x * strides[3];
                    out[dst] = grad[src] as f64;
                }
            }
        }
    }
    out
}

fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            (a - n).abs() <= tol * (1.0 + n.abs()),
            "{what}[{i}]: analytic {a} vs finite difference {n}"
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    for seed in 0..12u64 {
        let dims = [
            1 + (seed % 2) as usize,
            2,
            1 + (seed % 2) as usize,
            3 + (seed % 3) as usize,
            5,
            3,
        ];
        let c = random_case(seed, dims, (2, 3), seed % 2 == 0);
        let (q, k, v) = c.views();
        let rg =
            reference::backward::<f64>(&q, &k, &v, &c.mask, &c.params(), &c.dout_view()).unwrap();
        let [_, _, dq, dk, dv] = c.run_kernel();
        for (which, (name, r, kernel)) in [
            ("dq", &rg.dq, &dq),
            ("dk", &rg.dk, &dk),
            ("dv", &rg.dv, &dv),
        ]
        .into_iter()
        .enumerate()
        {
            let num = numeric(&c, which);
            let r32: Vec<f32> = r.iter().map(|&x| x as f32).collect();
            // The oracle is f64: only the finite-difference truncation error remains.
            assert_grad(
                &format!("seed {seed} reference {name}"),
                &to_layout(&c, which, &r32),
                &num,
                1e-4,
            );
            assert_grad(
                &format!("seed {seed} kernel {name}"),
                &to_layout(&c, which, kernel),
                &num,
                1e-3,
            );
        }
    }
}

#[test]
fn view_layout_roundtrip() {
    // The layout helper above must itself be right for the comparison to mean anything.
    let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
    let v = View::blhd("x", &data, [1, 2, 3, 4]).unwrap();
    assert_eq!(v.get(0, 1, 2, 3), data[(2 * 2 + 1) * 4 + 3]);
}
