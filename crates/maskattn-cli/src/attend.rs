//! `maskattn attend`: masked attention (and its gradients) on tensors from a safetensors file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use maskattn::{BlockMask, DenseMask, Mask, View};
use safetensors::SafeTensors;

use crate::mask_expr::{self, MaskData};
use crate::tensors::{self, Tensor};

#[derive(Args, Debug)]
pub struct AttendArgs {
    /// Input safetensors file: `q` [B, H_q, L_q, d], `k`, `v` [B, H_kv, L_k, d] (f32); optional
    /// `dout` (like q), `key_lengths` (i64 [B]), `doc_ids` (i64 [B or 1, L], self-attention)
    /// or `q_doc_ids` + `k_doc_ids` (cross attention), `mask` (u8 [B|1, H|1, L_q, L_k],
    /// non-zero = may attend); score modifiers (f32): `bias` [B|1, H_q|1, L_q|1, L_k|1],
    /// `alibi_slopes` [H_q], `sinks` [H_q], `rel_bias` [N, H_q] (with --rel-buckets N).
    pub input: PathBuf,
    /// Output safetensors file: `out`, `lse` (f32 [B, H_q, L_q], -inf for rows that see
    /// nothing, the sink's term included) and, when `dout` was given, `dq`, `dk`, `dv` and
    /// the gradient of each modifier given: `dbias`, `dalibi_slopes`, `dsinks`, `drel_bias`
    /// (shaped like their inputs).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Mask expression (the data terms read `key_lengths`, `doc_ids`, `mask` from the input).
    #[arg(long, default_value = "full", long_help = crate::mask_expr::syntax())]
    pub mask: String,
    /// Score scale (default 1/sqrt(d)).
    #[arg(long)]
    pub scale: Option<f32>,
    /// Soft-cap the scaled scores at C: `C · tanh(score / C)`.
    #[arg(long, value_name = "C")]
    pub softcap: Option<f32>,
    /// Buckets of the T5 relative positions in `rel_bias` [N, H_q].
    #[arg(long, value_name = "N", requires = "rel_max_distance")]
    pub rel_buckets: Option<usize>,
    /// Largest distance the T5 buckets tell apart (logarithmic beyond N/2 or N/4).
    #[arg(long, value_name = "M", requires = "rel_buckets")]
    pub rel_max_distance: Option<usize>,
    /// T5 buckets both ways (keys before and after the query get separate buckets).
    #[arg(long, requires = "rel_buckets")]
    pub rel_bidirectional: bool,
}

/// What a call takes besides the input file: scale, soft-capping and the T5 bucketing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub scale: Option<f32>,
    pub softcap: Option<f32>,
    /// `(num_buckets, max_distance, bidirectional)`.
    pub rel: Option<(usize, usize, bool)>,
}

/// The modifier tensors of the input file, read and checked against the call's shape.
struct Modifiers {
    bias: Option<(Vec<f32>, [usize; 4])>,
    alibi: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel: Option<(Vec<f32>, [usize; 2])>,
}

impl Modifiers {
    fn read(st: &SafeTensors, opts: &Options, heads: usize) -> Result<Self> {
        let per_head = |name: &str| -> Result<Option<Vec<f32>>> {
            if !tensors::has(st, name) {
                return Ok(None);
            }
            let t = tensors::f32(st, name, 1)?;
            if t.shape[0] != heads {
                bail!("{name} has shape {:?}, expected [H_q] = [{heads}]", t.shape);
            }
            Ok(Some(t.data))
        };
        let bias = if tensors::has(st, "bias") {
            let t = tensors::f32(st, "bias", 4)?;
            let dims: [usize; 4] = t.shape[..].try_into().expect("4-d");
            Some((t.data, dims))
        } else {
            None
        };
        let rel = match (tensors::has(st, "rel_bias"), opts.rel) {
            (false, None) => None,
            (true, None) => bail!(
                "the input holds `rel_bias`: give its bucketing with --rel-buckets N --rel-max-distance M [--rel-bidirectional]"
            ),
            (false, Some(_)) => bail!("--rel-buckets needs `rel_bias` (f32 [N, H_q]) in the input"),
            (true, Some((n, _, _))) => {
                let t = tensors::f32(st, "rel_bias", 2)?;
                if t.shape != [n, heads] {
                    bail!(
                        "rel_bias has shape {:?}, expected [--rel-buckets, H_q] = [{n}, {heads}]",
                        t.shape
                    );
                }
                Some((t.data, [n, heads]))
            }
        };
        Ok(Modifiers {
            bias,
            alibi: per_head("alibi_slopes")?,
            sinks: per_head("sinks")?,
            rel,
        })
    }

    /// The kernel parameters over these tensors.
    fn params(&self, opts: &Options) -> Result<maskattn::Params<'_>> {
        let mut p = maskattn::Params {
            scale: opts.scale,
            softcap: opts.softcap,
            alibi: self.alibi.as_deref(),
            sinks: self.sinks.as_deref(),
            ..Default::default()
        };
        if let Some((data, dims)) = &self.bias {
            p.bias = Some(maskattn::Bias::new(data, *dims)?);
        }
        if let (Some((table, _)), Some((n, m, bi))) = (&self.rel, opts.rel) {
            p.rel = Some(maskattn::RelBias::new(table, n, m, bi)?);
        }
        Ok(p)
    }
}

/// Mask data read from the input file, looked up only when the expression names it.
struct FileMaskData<'a> {
    st: &'a SafeTensors<'a>,
    batch: usize,
    lq: usize,
    lk: usize,
}

impl MaskData for FileMaskData<'_> {
    fn key_padding(&self) -> Result<Mask> {
        let t = tensors::i64(self.st, "key_lengths", 1)
            .context("--mask key-padding needs `key_lengths`")?;
        if t.shape[0] != self.batch {
            bail!(
                "key_lengths has {} entries, expected B = {}",
                t.shape[0],
                self.batch
            );
        }
        let lens = t
            .data
            .iter()
            .map(|&x| {
                usize::try_from(x)
                    .with_context(|| format!("key_lengths holds {x}; lengths are >= 0"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Mask::key_padding(lens))
    }

    fn documents(&self) -> Result<Mask> {
        let ids = |name: &str, len: usize| -> Result<(Vec<i64>, usize)> {
            let t = tensors::i64(self.st, name, 2)?;
            if (t.shape[0] != 1 && t.shape[0] != self.batch) || t.shape[1] != len {
                bail!(
                    "{name} has shape {:?}, expected [{} or 1, {len}]",
                    t.shape,
                    self.batch
                );
            }
            Ok((t.data, t.shape[0]))
        };
        if tensors::has(self.st, "doc_ids") {
            if self.lq != self.lk {
                bail!("doc_ids is for self-attention (L_q = L_k); with L_q = {} and L_k = {} give q_doc_ids and k_doc_ids", self.lq, self.lk);
            }
            let (d, rows) = ids("doc_ids", self.lq)?;
            return Ok(Mask::documents(d, rows));
        }
        let (q, qrows) = ids("q_doc_ids", self.lq)
            .context("--mask documents needs `doc_ids` (or `q_doc_ids` and `k_doc_ids`)")?;
        let (k, krows) = ids("k_doc_ids", self.lk)?;
        if qrows != krows {
            bail!("q_doc_ids has {qrows} rows but k_doc_ids has {krows}");
        }
        Ok(Mask::documents_cross(q, k, qrows))
    }

    fn dense(&self) -> Result<Mask> {
        let t = tensors::u8(self.st, "mask", 4).context("--mask dense needs `mask`")?;
        let dims: [usize; 4] = t.shape[..].try_into().unwrap();
        let allowed: Vec<bool> = t.data.iter().map(|&x| x != 0).collect();
        Ok(Mask::dense(DenseMask::new(allowed, dims)?))
    }
}

fn shape4(t: &Tensor<f32>, name: &str) -> Result<[usize; 4]> {
    t.shape[..]
        .try_into()
        .with_context(|| format!("{name} must be 4-d [B, H, L, d]"))
}

/// What one call computes from an input file: the output tensors (name, shape, values) and
/// what the message on stderr reports.
pub struct Computed {
    pub outputs: Vec<(&'static str, Vec<usize>, Vec<f32>)>,
    q_shape: [usize; 4],
    k_shape: [usize; 4],
    mask: Mask,
    stats: maskattn::BlockStats,
    elapsed: std::time::Duration,
}

/// Everything between the input file's bytes and the output tensors: `source` names the input
/// in messages, `build_mask` turns the file's mask data into the mask. Every bad input is an
/// error, never a panic (the fuzz test in `attend_fuzz.rs` holds it to that).
pub fn compute(
    bytes: &[u8],
    source: &str,
    build_mask: impl FnOnce(&dyn MaskData) -> Result<Mask>,
    opts: &Options,
) -> Result<Computed> {
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{source} is not a safetensors file"))?;
    let (q, k, v) = (
        tensors::f32(&st, "q", 4)?,
        tensors::f32(&st, "k", 4)?,
        tensors::f32(&st, "v", 4)?,
    );
    let (qs, ks, vs) = (shape4(&q, "q")?, shape4(&k, "k")?, shape4(&v, "v")?);
    let (qv, kv, vv) = (
        View::bhld("q", &q.data, qs)?,
        View::bhld("k", &k.data, ks)?,
        View::bhld("v", &v.data, vs)?,
    );
    let dims = maskattn::AttnDims::of(&qv, &kv, &vv)?;
    let data = FileMaskData {
        st: &st,
        batch: dims.batch,
        lq: dims.lq,
        lk: dims.lk,
    };
    let mask = build_mask(&data)?;
    let block = BlockMask::new(&mask, dims.mask_shape())?;
    let mods = Modifiers::read(&st, opts, dims.q_heads)?;
    let params = mods.params(opts)?;

    let t0 = Instant::now();
    let fwd = maskattn::forward(&qv, &kv, &vv, &block, &params)?;
    let lse_shape = vec![dims.batch, dims.q_heads, dims.lq];
    let mut outputs = Vec::new();
    if tensors::has(&st, "dout") {
        let dout = tensors::f32(&st, "dout", 4)?;
        let dv = View::bhld("dout", &dout.data, shape4(&dout, "dout")?)?;
        let ov = View::bhld("out", &fwd.out, qs)?;
        let g = maskattn::backward(
            &maskattn::Qkv::new(&qv, &kv, &vv),
            &ov,
            &fwd.lse,
            &dv,
            &block,
            &params,
        )?;
        outputs.push(("dq", qs.to_vec(), g.dq));
        outputs.push(("dk", ks.to_vec(), g.dk));
        outputs.push(("dv", vs.to_vec(), g.dv));
        let p = g.params;
        let grads = [
            (
                "dbias",
                p.dbias,
                mods.bias.as_ref().map(|(_, d)| d.to_vec()),
            ),
            (
                "dalibi_slopes",
                p.dalibi,
                mods.alibi.as_ref().map(|a| vec![a.len()]),
            ),
            (
                "dsinks",
                p.dsinks,
                mods.sinks.as_ref().map(|s| vec![s.len()]),
            ),
            (
                "drel_bias",
                p.drel,
                mods.rel.as_ref().map(|(_, d)| d.to_vec()),
            ),
        ];
        for (name, grad, shape) in grads {
            if let (Some(g), Some(shape)) = (grad, shape) {
                outputs.push((name, shape, g));
            }
        }
    }
    outputs.insert(0, ("lse", lse_shape, fwd.lse));
    outputs.insert(0, ("out", qs.to_vec(), fwd.out));
    Ok(Computed {
        outputs,
        q_shape: qs,
        k_shape: ks,
        mask,
        stats: block.stats(),
        elapsed: t0.elapsed(),
    })
}

pub fn run(args: &AttendArgs) -> Result<()> {
    let terms = mask_expr::parse(&args.mask)?;
    // Refuse an output that cannot be written (a directory) before the work, not after.
    crate::output::plan(&args.output)?;
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let c = compute(
        &bytes,
        &args.input.display().to_string(),
        |data| mask_expr::build(&terms, data),
        &Options {
            scale: args.scale,
            softcap: args.softcap,
            rel: args.rel_buckets.map(|n| {
                (
                    n,
                    args.rel_max_distance.unwrap_or(0),
                    args.rel_bidirectional,
                )
            }),
        },
    )?;
    let outputs: Vec<(&str, Vec<usize>, &[f32])> = c
        .outputs
        .iter()
        .map(|(n, s, d)| (*n, s.clone(), &d[..]))
        .collect();
    tensors::write_f32(&args.output, &outputs)?;

    let (qs, ks, mask, st) = (c.q_shape, c.k_shape, &c.mask, &c.stats);
    eprintln!(
        "attend: q {qs:?} k {ks:?} mask {mask:?}: {:.1}% of pairs hidden, {:.1}% of tiles skipped; {} in {:.2} ms -> {}",
        100.0 * st.hidden_pair_fraction(),
        100.0 * st.skipped_tile_fraction(),
        if outputs.len() > 2 { "forward+backward" } else { "forward" },
        c.elapsed.as_secs_f64() * 1e3,
        args.output.display()
    );
    Ok(())
}

#[cfg(test)]
#[path = "attend_fuzz.rs"]
mod fuzz;
