//! `maskattn demo`: every mask kind on one built-in shape, run by the fast kernels and by the
//! f64 reference side by side, with the accuracy rule applied and the work each mask saves.

use anyhow::{bail, Result};
use clap::Args;
use maskattn::{reference, BlockMask, DenseMask, Mask, Params, View};

use crate::mask_expr::{self, MaskData};
use crate::measure::{elements, median_of, nonzero, parse_dims, try_data};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Shape B,H_q,H_kv,L,d.
    #[arg(long, default_value = "2,8,4,256,64", value_parser = parse_dims::<5>)]
    pub shape: [usize; 5],
    /// Run these masks instead of the built-in list (repeat the flag for several):
    /// key-padding is L, L − L/3, … valid keys per batch row, documents 4 per row, dense a
    /// random 30% of the pairs per head.
    #[arg(long, long_help = crate::mask_expr::syntax())]
    pub mask: Vec<String>,
}

/// The demo's data for the data terms, drawn for its shape.
struct DemoData {
    batch: usize,
    heads: usize,
    l: usize,
}

impl MaskData for DemoData {
    fn key_padding(&self) -> Result<Mask> {
        let (b, l) = (self.batch, self.l);
        Ok(Mask::key_padding(
            (0..b).map(|i| l - (i * l / 3).min(l)).collect::<Vec<_>>(),
        ))
    }
    fn documents(&self) -> Result<Mask> {
        let (b, l) = (self.batch, self.l);
        let n = elements("document ids", &[b, l])?;
        let docs: Vec<i64> = (0..n).map(|x| ((x % l) * 4 / l) as i64).collect();
        Ok(Mask::documents(docs, b))
    }
    fn dense(&self) -> Result<Mask> {
        let (h, l) = (self.heads, self.l);
        let n = elements("dense mask", &[h, l, l])?;
        let dense: Vec<bool> = try_data(n, 5)?.iter().map(|&x| x < -0.4).collect();
        Ok(Mask::dense(DenseMask::new(dense, [1, h, l, l])?))
    }
}

/// The squarest `h × w = n` grid, for the 2-D neighbourhood on any length.
fn grid_of(n: usize) -> (usize, usize) {
    let h = (1..=n)
        .take_while(|h| h.checked_mul(*h).is_some_and(|hh| hh <= n))
        .filter(|h| n.is_multiple_of(*h))
        .last()
        .unwrap_or(1);
    (h, n / h)
}

/// An expression as a table label: long ones shortened to their first 40 characters.
fn label(expr: &str) -> String {
    match expr.char_indices().nth(40) {
        Some((cut, _)) => format!("{}… ({} bytes)", &expr[..cut], expr.len()),
        None => expr.to_string(),
    }
}

/// The built-in list: one row per kind of mask, as (label, expression).
fn built_in(l: usize) -> Vec<(String, String)> {
    let (gh, gw) = grid_of(l);
    [
        ("full", "full".to_string()),
        ("causal", "causal".into()),
        ("window(32,0)", "window(32,0)".into()),
        ("key-padding", "key-padding".into()),
        ("documents (4 per row)", "documents".into()),
        ("documents & causal", "documents & causal".into()),
        ("", format!("prefix({})", 64.min(l))),
        ("causal & chunks(64)", "causal & chunks(64)".into()),
        ("block-causal(48)", "block-causal(48)".into()),
        ("", format!("neighbourhood({gh},{gw},2)")),
        ("dense 30% [1,H,L,L]", "dense".into()),
    ]
    .into_iter()
    .map(|(label, expr)| {
        let label = if label.is_empty() {
            expr.clone()
        } else {
            label.to_string()
        };
        (label, expr)
    })
    .collect()
}

pub fn run(args: &DemoArgs) -> Result<()> {
    nonzero("--shape", &args.shape)?;
    let [b, hq, hkv, l, d] = args.shape;
    let (qs, ks) = ([b, hq, l, d], [b, hkv, l, d]);
    // Every size checked before anything is allocated.
    let (nq, nk) = (elements("q", &qs)?, elements("k", &ks)?);
    let exprs: Vec<(String, String)> = if args.mask.is_empty() {
        built_in(l)
    } else {
        args.mask.iter().map(|m| (label(m), m.clone())).collect()
    };
    let data = DemoData {
        batch: b,
        heads: hq,
        l,
    };
    let mut masks: Vec<(String, Mask)> = Vec::new();
    for (label, expr) in exprs {
        let mask = mask_expr::build(&mask_expr::parse(&expr)?, &data)?;
        masks.push((label, mask));
    }
    if args.mask.is_empty() {
        // A function mask has no written form: the built-in list adds one by hand.
        masks.push((
            "fn (i+j) % 3 != 0".into(),
            Mask::from_fn_ij(|i, j| (i + j) % 3 != 0),
        ));
    }
    let (q, k, v, dout) = (
        try_data(nq, 1)?,
        try_data(nk, 2)?,
        try_data(nk, 3)?,
        try_data(nq, 4)?,
    );
    let (qv, kv, vv) = (
        View::bhld("q", &q, qs)?,
        View::bhld("k", &k, ks)?,
        View::bhld("v", &v, ks)?,
    );
    let dv = View::bhld("dout", &dout, qs)?;
    let dims = maskattn::AttnDims::of(&qv, &kv, &vv)?;

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
        // Three calls, the median time: a single first call also pays for starting the
        // thread pool and faulting in fresh memory.
        let (fwd, t_fwd) = median_of(3, || {
            maskattn::forward(&qv, &kv, &vv, &block, &Params::default())
        })?;
        let ov = View::bhld("out", &fwd.out, qs)?;
        let (g, t_bwd) = median_of(3, || {
            maskattn::backward(
                &maskattn::Qkv::new(&qv, &kv, &vv),
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
            failed.push(name.as_str());
        }
        let st = block.stats();
        let e = |a: &reference::Accuracy| format!("{:.1e}/{:.1e}", a.kernel_err, a.bound);
        println!(
            "{name:<22} {:>6.1}% {:>7.1}% {:>8.2} {:>10.2}  {:>17} {:>17} {:>17}  {}",
            100.0 * st.hidden_pair_fraction(),
            100.0 * st.skipped_tile_fraction(),
            t_fwd,
            t_bwd,
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
