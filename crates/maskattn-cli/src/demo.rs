//! `maskattn demo`: every mask kind on one built-in shape, run by the fast kernels and by the
//! f64 reference side by side, with the accuracy rule applied and the work each mask saves.

use std::time::Instant;

use crate::bench::data;
use anyhow::{bail, Result};
use clap::Args;
use maskattn::{reference, BlockMask, DenseMask, Mask, Params, View};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Shape B,H_q,H_kv,L,d.
    #[arg(long, default_value = "2,8,4,256,64", value_parser = crate::bench::parse_dims::<5>)]
    pub shape: [usize; 5],
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let [b, hq, hkv, l, d] = args.shape;
    let (qs, ks) = ([b, hq, l, d], [b, hkv, l, d]);
    let (q, k, v, dout) = (
        data(b * hq * l * d, 1),
        data(b * hkv * l * d, 2),
        data(b * hkv * l * d, 3),
        data(b * hq * l * d, 4),
    );
    let (qv, kv, vv) = (
        View::bhld("q", &q, qs)?,
        View::bhld("k", &k, ks)?,
        View::bhld("v", &v, ks)?,
    );
    let dv = View::bhld("dout", &dout, qs)?;
    let dims = maskattn::AttnDims::of(&qv, &kv, &vv)?;
    let docs: Vec<i64> = (0..b * l).map(|x| ((x % l) * 4 / l) as i64).collect();
    let dense: Vec<bool> = data(hq * l * l, 5).iter().map(|&x| x < -0.4).collect();
    let masks: Vec<(&str, Mask)> = vec![
        ("full", Mask::full()),
        ("causal", Mask::causal()),
        ("window(32,0)", Mask::window(32, 0)),
        (
            "key-padding",
            Mask::key_lengths((0..b).map(|i| l - i * l / 3).collect::<Vec<_>>()),
        ),
        ("documents (4 per row)", Mask::documents(docs.clone(), b)),
        (
            "documents & causal",
            Mask::documents(docs, b) & Mask::causal(),
        ),
        ("prefix(64)", Mask::prefix(64.min(l))),
        ("causal & chunks(64)", Mask::causal() & Mask::chunks(64)),
        ("block-causal(48)", Mask::block_causal(48)),
        ("neighbourhood(16x16,2)", Mask::neighbourhood(16, 16, 2)),
        (
            "dense 30% [1,H,L,L]",
            Mask::dense(DenseMask::new(dense, [1, hq, l, l])?),
        ),
        (
            "fn (i+j) % 3 != 0",
            Mask::from_fn_ij(|i, j| (i + j) % 3 != 0),
        ),
    ];

    println!(
        "q [{b}, {hq}, {l}, {d}], k/v [{b}, {hkv}, {l}, {d}], {} threads; errors are max |kernel - f64| against the bound 2·|naive f32 - f64| + 1e-5",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>7} {:>8} {:>8} {:>10}  {:>17} {:>17} {:>17}  ok",
        "mask",
        "hidden",
        "skipped",
        "fwd ms",
        "bwd ms",
        "out err/bound",
        "dq err/bound",
        "dk err/bound"
    );
    let mut failed = Vec::new();
    for (name, mask) in &masks {
        let block = BlockMask::new(mask, dims.mask_shape())?;
        let (fwd, t_fwd) =
            median_of_3(|| maskattn::forward(&qv, &kv, &vv, &block, &Params::default()))?;
        let ov = View::bhld("out", &fwd.out, qs)?;
        let (g, t_bwd) = median_of_3(|| {
            maskattn::backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dv,
                &block,
                &Params::default(),
            )
        })?;

        let gold = reference::backward::<f64>(&qv, &kv, &vv, mask, &Params::default(), &dv)?;
        let naive = reference::backward::<f32>(&qv, &kv, &vv, mask, &Params::default(), &dv)?;
        let gold_f = reference::forward::<f64>(&qv, &kv, &vv, mask, &Params::default())?;
        let naive_f = reference::forward::<f32>(&qv, &kv, &vv, mask, &Params::default())?;
        let eps = reference::EPS_F32;
        let acc = [
            reference::accuracy(&fwd.out, &gold_f.out, &naive_f.out, eps),
            reference::accuracy(&fwd.lse, &gold_f.lse, &naive_f.lse, eps),
            reference::accuracy(&g.dq, &gold.dq, &naive.dq, eps),
            reference::accuracy(&g.dk, &gold.dk, &naive.dk, eps),
            reference::accuracy(&g.dv, &gold.dv, &naive.dv, eps),
        ];
        let ok = acc.iter().all(|a| a.ok);
        if !ok {
            failed.push(*name);
        }
        let st = block.stats();
        let e = |a: &reference::Accuracy| format!("{:.1e}/{:.1e}", a.kernel_err, a.bound);
        println!(
            "{name:<22} {:>6.1}% {:>7.1}% {:>8.2} {:>10.2}  {:>17} {:>17} {:>17}  {}",
            100.0 * st.hidden_pair_fraction(),
            100.0 * st.skipped_tile_fraction(),
            t_fwd.as_secs_f64() * 1e3,
            t_bwd.as_secs_f64() * 1e3,
            e(&acc[0]),
            e(&acc[2]),
            e(&acc[3]),
            if ok { "yes" } else { "NO" }
        );
    }
    if !failed.is_empty() {
        bail!("accuracy rule failed for: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs `f` three times and returns its last result with the median time: a single first
/// call also pays for starting the thread pool and faulting in fresh memory.
fn median_of_3<T>(
    mut f: impl FnMut() -> maskattn::Result<T>,
) -> maskattn::Result<(T, std::time::Duration)> {
    let mut times = Vec::with_capacity(3);
    let mut last = None;
    for _ in 0..3 {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    times.sort();
    Ok((last.expect("three runs"), times[1]))
}
