//! `maskattn bench`: times the kernels on one shape and mask (or the suite of the speed
//! issue), and reports them as docs/design.md section 5 asks: median ms, dense and useful
//! GFLOP/s, the fraction of this machine's practical peak (a large f32 matrix product,
//! measured on the spot with the same threads), tiles skipped and extra memory.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use maskattn::half::{bf16, f16};
use maskattn::{BlockMask, DenseMask, Element, Mask, Params, View};
use serde::Serialize;

use crate::alloc_count;
use crate::mask_expr::{self, MaskData};
use crate::measure::{self, elements, parse_dims, time, try_data};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Shape B,H,L,d (H query heads, L queries).
    #[arg(long, default_value = "1,8,1024,64", value_parser = parse_dims::<4>)]
    pub shape: [usize; 4],
    /// Key length (default: L, or the KV cache length for decode).
    #[arg(long)]
    pub lk: Option<usize>,
    /// Key/value heads (grouped-query attention; default: H).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Mask expression; key-padding hides the last 25% of keys, documents packs 4 equal
    /// documents, dense is a random half of the pairs.
    #[arg(long, default_value = "full", long_help = crate::mask_expr::syntax())]
    pub mask: String,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    #[arg(long, value_enum, default_value = "fwd")]
    pub pass: Pass,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run the grid of the speed issue (shapes × masks × passes, plus bf16, head size 128,
    /// grouped-query prefill and decode).
    #[arg(long)]
    pub suite: bool,
    /// Print the cases (one JSON object per line, the flags that select each) instead of
    /// timing them; with `--suite`, the grid (`bench/compare_torch.py` reads it).
    #[arg(long)]
    pub list: bool,
    /// Also time the kernel crate's f32 reference (materialised scores, one thread).
    /// `--naive` is the old name.
    #[arg(long, alias = "naive")]
    pub reference: bool,
    #[command(flatten)]
    pub mods: ModArgs,
    /// Time each score modifier at (1,8,2048,64) causal f32, forward and forward+backward,
    /// against the plain kernel in the same run.
    #[arg(long)]
    pub suite_mods: bool,
}

/// The score modifiers of a timed case (docs/design.md section 1).
#[derive(Args, Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ModArgs {
    /// Soft-cap the scaled scores at C.
    #[arg(long, value_name = "C")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub softcap: Option<f32>,
    /// ALiBi with the standard slopes.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub alibi: bool,
    /// An attention sink per head (random logits).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sinks: bool,
    /// T5 relative positions with N buckets (a random table, max distance 128, one-way).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_buckets: Option<usize>,
    /// A dense random bias [1, H, L_q, L_k]; its GB/s is reported (bytes of bias read, and
    /// of dbias written in fwd+bwd, per second).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bias: bool,
}

impl ModArgs {
    fn is_none(&self) -> bool {
        *self == ModArgs::default()
    }

    /// A short name: `plain`, or the modifiers joined by `+`.
    fn name(&self) -> String {
        let mut v = Vec::new();
        if let Some(c) = self.softcap {
            v.push(format!("softcap {c}"));
        }
        if self.alibi {
            v.push("alibi".into());
        }
        if self.sinks {
            v.push("sinks".into());
        }
        if let Some(n) = self.rel_buckets {
            v.push(format!("t5 {n}"));
        }
        if self.bias {
            v.push("bias".into());
        }
        if v.is_empty() {
            "plain".into()
        } else {
            v.join("+")
        }
    }
}

/// The modifier data of one case: standard slopes, random sinks, T5 table and bias.
struct ModData {
    alibi: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel: Option<(Vec<f32>, usize)>,
    bias: Option<(Vec<f32>, [usize; 4])>,
    softcap: Option<f32>,
}

/// The T5 max distance of `--rel-buckets`.
const REL_MAX_DISTANCE: usize = 128;

impl ModData {
    fn new(m: &ModArgs, h: usize, lq: usize, lk: usize) -> Result<Self> {
        Ok(ModData {
            alibi: m.alibi.then(|| maskattn::alibi_slopes(h)),
            sinks: m.sinks.then(|| measure::data(h, 11)),
            rel: m.rel_buckets.map(|n| (measure::data(n * h, 12), n)),
            bias: match m.bias {
                true => Some((
                    try_data(elements("bias", &[h, lq, lk])?, 13)?,
                    [1, h, lq, lk],
                )),
                false => None,
            },
            softcap: m.softcap,
        })
    }

    fn params(&self) -> Result<Params<'_>> {
        let mut p = Params {
            softcap: self.softcap,
            alibi: self.alibi.as_deref(),
            sinks: self.sinks.as_deref(),
            ..Default::default()
        };
        if let Some((t, n)) = &self.rel {
            p.rel = Some(maskattn::RelBias::new(t, *n, REL_MAX_DISTANCE, false)?);
        }
        if let Some((b, dims)) = &self.bias {
            p.bias = Some(maskattn::Bias::new(b, *dims)?);
        }
        Ok(p)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Pass {
    #[value(name = "fwd")]
    #[serde(rename = "fwd")]
    Fwd,
    #[value(name = "fwd+bwd")]
    #[serde(rename = "fwd+bwd")]
    FwdBwd,
    #[value(name = "decode")]
    #[serde(rename = "decode")]
    Decode,
}

/// One measured case.
#[derive(Serialize, Debug)]
pub struct Row {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub mask: String,
    pub dtype: Dtype,
    pub pass: Pass,
    pub threads: usize,
    #[serde(serialize_with = "crate::peak::debug_name")]
    pub isa: maskattn::Isa,
    pub median_ms: f64,
    pub dense_gflops: f64,
    pub useful_gflops: f64,
    pub peak_fraction: f64,
    pub tiles_skipped: f64,
    pub pairs_hidden: f64,
    pub extra_mib: f64,
    /// Decode only: bytes of K and V read per second, and that as a fraction of the
    /// machine's measured read bandwidth.
    pub gb_per_s: Option<f64>,
    pub bandwidth_fraction: Option<f64>,
    /// With `--reference`: the kernel crate's f32 reference on the same case.
    pub reference_ms: Option<f64>,
    /// The score modifiers (`plain` for none).
    pub mods: String,
    /// With `--bias`: bytes of bias read (and dbias written, fwd+bwd) per second.
    pub bias_gb_per_s: Option<f64>,
}

struct SynthData {
    batch: usize,
    lq: usize,
    lk: usize,
}

impl MaskData for SynthData {
    fn key_padding(&self) -> Result<Mask> {
        Ok(Mask::key_padding(vec![self.lk - self.lk / 4; self.batch]))
    }
    fn documents(&self) -> Result<Mask> {
        let ids = |n: usize| (0..n).map(|i| (i * 4 / n) as i64).collect::<Vec<_>>();
        Ok(Mask::documents_cross(ids(self.lq), ids(self.lk), 1))
    }
    fn dense(&self) -> Result<Mask> {
        let keep = try_data(elements("dense mask", &[self.lq, self.lk])?, 9)?
            .iter()
            .map(|&x| x < 0.0)
            .collect::<Vec<_>>();
        Ok(Mask::dense(DenseMask::new(keep, [1, 1, self.lq, self.lk])?))
    }
}

#[derive(Serialize)]
struct Case {
    shape: [usize; 4],
    lk: usize,
    kv_heads: usize,
    mask: String,
    dtype: Dtype,
    pass: Pass,
    #[serde(skip_serializing_if = "ModArgs::is_none", flatten)]
    mods: ModArgs,
}

fn convert<T: Element>(x: &[f32], f: impl Fn(f32) -> T) -> Vec<T> {
    x.iter().map(|&v| f(v)).collect()
}

fn run_case(c: &Case, reps: usize, reference: bool, peak: f64, bw: f64) -> Result<Row> {
    match c.dtype {
        Dtype::F32 => run_typed::<f32>(c, reps, reference, peak, bw, |x| x),
        Dtype::Bf16 => run_typed::<bf16>(c, reps, reference, peak, bw, bf16::from_f32),
        Dtype::F16 => run_typed::<f16>(c, reps, reference, peak, bw, f16::from_f32),
    }
}

fn run_typed<T: Element>(
    c: &Case,
    reps: usize,
    reference: bool,
    peak: f64,
    bw: f64,
    to: impl Fn(f32) -> T,
) -> Result<Row> {
    let [b, h, l, d] = c.shape;
    let lq = if c.pass == Pass::Decode { 1 } else { l };
    let (lk, hkv) = (c.lk, c.kv_heads);
    let (qs, ks) = ([b, h, lq, d], [b, hkv, lk, d]);
    // Sizes checked before anything is allocated: a product that wraps would run a tiny
    // case and report it as this one.
    let (nq, nk) = (elements("q", &qs)?, elements("k", &ks)?);
    let (q32, k32, v32) = (try_data(nq, 1)?, try_data(nk, 2)?, try_data(nk, 3)?);
    let (q, k, v) = (convert(&q32, &to), convert(&k32, &to), convert(&v32, &to));
    // The output gradient arrives in the storage type, as a framework training in it (and
    // PyTorch in the comparison) hands it over; the kernel reads it as f32.
    let dout: Vec<f32> = try_data(nq, 4)?
        .into_iter()
        .map(|x| to(x).to_f32())
        .collect();
    let (qv, kv, vv) = (
        View::bhld("q", &q, qs)?,
        View::bhld("k", &k, ks)?,
        View::bhld("v", &v, ks)?,
    );
    let terms = mask_expr::parse(&c.mask)?;
    let mask = mask_expr::build(&terms, &SynthData { batch: b, lq, lk })?;
    let dims = maskattn::AttnDims::of(&qv, &kv, &vv)?;
    let block = BlockMask::new(&mask, dims.mask_shape())?;
    let st = block.stats();
    let mod_data = ModData::new(&c.mods, h, lq, lk)?;
    let params = mod_data.params()?;

    // Extra memory: the highest allocation level during one call, less what was live before
    // it and less its outputs (O and LSE; and dQ, dK, dV for the backward).
    // (These fit: q's and k's sizes in bytes were checked above.)
    let out_bytes = 4 * (nq + b * h * lq);
    let grad_bytes = 4 * (nq + 2 * nk);
    // A warm-up call, so that the thread pool's first start is not counted.
    maskattn::forward(&qv, &kv, &vv, &block, &params)?;
    let dv = View::bhld("dout", &dout, qs)?;
    let before = alloc_count::live();
    alloc_count::reset_peak();
    let extra = match c.pass {
        Pass::FwdBwd => {
            let f = maskattn::forward(&qv, &kv, &vv, &block, &params)?;
            let fo = View::bhld("out", &f.out, qs)?;
            let g = maskattn::backward(
                &maskattn::Qkv::new(&qv, &kv, &vv),
                &fo,
                &f.lse,
                &dv,
                &block,
                &params,
            )?;
            let param_bytes = 4 * [
                g.params.dbias.as_ref(),
                g.params.dalibi.as_ref(),
                g.params.dsinks.as_ref(),
                g.params.drel.as_ref(),
            ]
            .iter()
            .flatten()
            .map(|v| v.len())
            .sum::<usize>();
            drop(g);
            alloc_count::peak() - before - out_bytes - grad_bytes - param_bytes
        }
        _ => {
            let f = maskattn::forward(&qv, &kv, &vv, &block, &params)?;
            drop(f);
            alloc_count::peak() - before - out_bytes
        }
    };

    let ms = match c.pass {
        Pass::FwdBwd => time(reps, || {
            let f = maskattn::forward(&qv, &kv, &vv, &block, &params).unwrap();
            let fo = View::bhld("out", &f.out, qs).unwrap();
            maskattn::backward(
                &maskattn::Qkv::new(&qv, &kv, &vv),
                &fo,
                &f.lse,
                &dv,
                &block,
                &params,
            )
            .unwrap();
        }),
        _ => time(reps, || {
            maskattn::forward(&qv, &kv, &vv, &block, &params).unwrap();
        }),
    };
    let reference_ms = if reference {
        let (q, k, v) = (
            View::bhld("q", &q32, qs)?,
            View::bhld("k", &k32, ks)?,
            View::bhld("v", &v32, ks)?,
        );
        Some(match c.pass {
            Pass::FwdBwd => time(1, || {
                maskattn::reference::forward::<f32>(&q, &k, &v, &mask, &params).unwrap();
                maskattn::reference::backward::<f32>(&q, &k, &v, &mask, &params, &dv).unwrap();
            }),
            _ => time(1, || {
                maskattn::reference::forward::<f32>(&q, &k, &v, &mask, &params).unwrap();
            }),
        })
    } else {
        None
    };

    let factor = if c.pass == Pass::FwdBwd { 3.5 } else { 1.0 };
    let dense = factor * 4.0 * (b * h * lq * lk * d) as f64;
    let useful = factor * 4.0 * st.allowed_pairs as f64 * d as f64;
    let useful_gflops = useful / ms / 1e6;
    let elem = std::mem::size_of::<T>();
    let gb_per_s =
        (c.pass == Pass::Decode).then(|| (2 * b * hkv * lk * d * elem) as f64 / ms / 1e6);
    // The bias is read by the forward; the backward reads it again and writes dbias.
    let bias_gb_per_s = mod_data.bias.as_ref().map(|(bias, _)| {
        let passes = if c.pass == Pass::FwdBwd { 3 } else { 1 };
        (passes * 4 * bias.len()) as f64 / ms / 1e6
    });
    Ok(Row {
        batch: b,
        heads: h,
        kv_heads: hkv,
        lq,
        lk,
        d,
        mask: c.mask.clone(),
        dtype: c.dtype,
        pass: c.pass,
        threads: rayon::current_num_threads(),
        isa: maskattn::current_isa(),
        median_ms: ms,
        dense_gflops: dense / ms / 1e6,
        useful_gflops,
        peak_fraction: useful_gflops / peak,
        tiles_skipped: st.skipped_tile_fraction(),
        pairs_hidden: st.hidden_pair_fraction(),
        extra_mib: extra as f64 / (1 << 20) as f64,
        gb_per_s,
        bandwidth_fraction: gb_per_s.map(|g| g / bw),
        reference_ms,
        mods: c.mods.name(),
        bias_gb_per_s,
    })
}

/// Each score modifier alone at (1,8,2048,64) causal f32, forward and forward+backward,
/// each pass's plain case first (the ratios' denominator).
fn suite_mods() -> Vec<Case> {
    let each = [
        ModArgs::default(),
        ModArgs {
            softcap: Some(30.0),
            ..Default::default()
        },
        ModArgs {
            alibi: true,
            ..Default::default()
        },
        ModArgs {
            sinks: true,
            ..Default::default()
        },
        ModArgs {
            rel_buckets: Some(32),
            ..Default::default()
        },
        ModArgs {
            bias: true,
            ..Default::default()
        },
    ];
    let mut cases = Vec::new();
    for pass in [Pass::Fwd, Pass::FwdBwd] {
        for mods in each {
            cases.push(Case {
                shape: [1, 8, 2048, 64],
                lk: 2048,
                kv_heads: 8,
                mask: "causal".into(),
                dtype: Dtype::F32,
                pass,
                mods,
            });
        }
    }
    cases
}

/// The grid of the speed issue (`--suite --list` prints it; `bench/compare_torch.py` and
/// the `bench_suite` test read it), as (B, H_q, L, d) / H_kv:
/// - d = 64, f32, five masks × fwd, fwd+bwd: (1,8,1024), (1,8,2048), (1,8,4096), (4,8,512);
///   and (1,8,2048) in bf16;
/// - d = 128, f32 and bf16 × fwd, fwd+bwd: (1,8,2048) full and causal, (1,32/8,2048) causal;
/// - decode, f32: one query of 32 heads on a cache of 4096 / 8, 32768 / 8, 32768 / 2.
fn suite() -> Vec<Case> {
    let masks = [
        "full",
        "causal",
        "key-padding",
        "window(256,0)",
        "documents",
    ];
    let mut cases = Vec::new();
    let mut add = |shape: [usize; 4], dtype: Dtype| {
        for pass in [Pass::Fwd, Pass::FwdBwd] {
            for m in masks {
                cases.push(Case {
                    shape,
                    lk: shape[2],
                    kv_heads: shape[1],
                    mask: m.to_string(),
                    dtype,
                    pass,
                    mods: ModArgs::default(),
                });
            }
        }
    };
    for shape in [
        [1, 8, 1024, 64],
        [1, 8, 2048, 64],
        [1, 8, 4096, 64],
        [4, 8, 512, 64],
    ] {
        add(shape, Dtype::F32);
    }
    add([1, 8, 2048, 64], Dtype::Bf16);
    // Head size 128 (most current LLMs), full and causal, and grouped-query prefill (32
    // query heads on 8 key/value heads, causal: a Llama-style model reading its prompt), in
    // f32 and bf16. Only these masks: the five masks at d = 64 already show how skipping
    // tiles pays, and each cell here costs twice a d = 64 one (four at 32 heads).
    for dtype in [Dtype::F32, Dtype::Bf16] {
        for pass in [Pass::Fwd, Pass::FwdBwd] {
            for (shape, kv_heads, mask) in [
                ([1, 8, 2048, 128], 8, "full"),
                ([1, 8, 2048, 128], 8, "causal"),
                ([1, 32, 2048, 128], 8, "causal"),
            ] {
                cases.push(Case {
                    shape,
                    lk: shape[2],
                    kv_heads,
                    mask: mask.into(),
                    dtype,
                    pass,
                    mods: ModArgs::default(),
                });
            }
        }
    }
    for (lk, kvh) in [(4096, 8), (32768, 8), (32768, 2)] {
        cases.push(Case {
            shape: [1, 32, 1, 128],
            lk,
            kv_heads: kvh,
            mask: "full".into(),
            dtype: Dtype::F32,
            pass: Pass::Decode,
            mods: ModArgs::default(),
        });
    }
    cases
}

fn print_header() {
    println!(
        "{:<18} {:<14} {:<5} {:<7} {:>9} {:>8} {:>8} {:>6} {:>6} {:>7} {:>8} {:>9}",
        "B,Hq/Hkv,Lq,Lk,d",
        "mask",
        "dtype",
        "pass",
        "ms",
        "dense",
        "useful",
        "%limit",
        "%gemm",
        "skipped",
        "extraMiB",
        "GB/s"
    );
}

fn print_row(r: &Row, limit: &str) {
    let dt = format!("{:?}", r.dtype).to_lowercase();
    let pass = match r.pass {
        Pass::Fwd => "fwd",
        Pass::FwdBwd => "fwd+bwd",
        Pass::Decode => "decode",
    };
    println!(
        "{:<18} {:<14} {:<5} {:<7} {:>9.2} {:>8.1} {:>8.1} {limit:>6} {:>5.0}% {:>6.1}% {:>8.1} {:>9}{}",
        format!(
            "{},{}/{},{},{},{}",
            r.batch, r.heads, r.kv_heads, r.lq, r.lk, r.d
        ),
        r.mask,
        dt,
        pass,
        r.median_ms,
        r.dense_gflops,
        r.useful_gflops,
        100.0 * r.peak_fraction,
        100.0 * r.tiles_skipped,
        r.extra_mib,
        match (r.gb_per_s, r.bias_gb_per_s) {
            (Some(g), _) => format!(
                "{g:.1} ({:.0}%)",
                100.0 * r.bandwidth_fraction.unwrap_or(f64::NAN)
            ),
            (None, Some(g)) => format!("{g:.1} bias"),
            (None, None) => String::new(),
        },
        format_args!(
            "{}{}",
            if r.mods == "plain" {
                String::new()
            } else {
                format!("  with {}", r.mods)
            },
            r.reference_ms.map_or(String::new(), |n| format!(
                "  reference {n:.1} ms ({:.1}x)",
                n / r.median_ms
            ))
        ),
    );
}

/// The `--suite-mods` summary: each modifier's time against the plain kernel of its pass.
fn print_mods_summary(rows: &[Row]) {
    println!();
    println!(
        "{:<14} {:<7} {:>9} {:>9} {:>10}",
        "modifier", "pass", "ms", "x plain", "bias GB/s"
    );
    for r in rows {
        let plain = rows
            .iter()
            .find(|p| p.pass == r.pass && p.mods == "plain")
            .map_or(f64::NAN, |p| p.median_ms);
        println!(
            "{:<14} {:<7} {:>9.2} {:>9.2} {:>10}",
            r.mods,
            if r.pass == Pass::Fwd {
                "fwd"
            } else {
                "fwd+bwd"
            },
            r.median_ms,
            r.median_ms / plain,
            r.bias_gb_per_s.map_or(String::new(), |g| format!("{g:.1}"))
        );
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    measure::nonzero("--shape", &args.shape)?;
    let h = args.shape[1];
    let l = args.shape[2];
    let cases = if args.suite_mods {
        suite_mods()
    } else if args.suite {
        suite()
    } else {
        let kv_heads = args.kv_heads.unwrap_or(h);
        vec![Case {
            shape: args.shape,
            lk: args.lk.unwrap_or(l),
            kv_heads,
            mask: args.mask.clone(),
            dtype: args.dtype,
            pass: args.pass,
            mods: args.mods,
        }]
    };
    if args.list {
        for c in &cases {
            println!("{}", serde_json::to_string(c)?);
        }
        return Ok(());
    }
    for c in &cases {
        // Parse every expression and check every size before measuring the peak.
        mask_expr::parse(&c.mask)?;
        measure::nonzero("--lk / --kv-heads", &[c.lk, c.kv_heads])?;
        let [b, h, l, d] = c.shape;
        let lq = if c.pass == Pass::Decode { 1 } else { l };
        elements("--shape", &[b, h, lq, d])?;
        elements("k and v of --shape", &[b, c.kv_heads, c.lk, d])?;
    }
    let peak = measure::practical_peak();
    let decoding = cases.iter().any(|c| c.pass == Pass::Decode);
    let bw = if decoding {
        measure::practical_bandwidth()
    } else {
        f64::NAN
    };
    let (mut limits, paths) = (crate::peak::measure(), crate::peak::paths());
    if args.json {
        println!(
            "{}",
            serde_json::json!({"practical_peak_gflops": peak, "bandwidth_gb_per_s": bw, "threads": rayon::current_num_threads(), "isa": format!("{:?}", paths.isa), "products": maskattn_candle::products::products_backend(), "peaks": crate::peak::header_json(&limits, &paths)})
        );
    } else {
        println!("{}", crate::peak::header(&limits, &paths));
        println!(
            "practical peak: {peak:.1} GFLOP/s (2048^3 f32 matrix product on {}, {} threads); kernels on {:?}; GFLOP/s columns: dense counts every pair, useful only allowed ones (fwd+bwd = 3.5x fwd)",
            maskattn_candle::products::products_backend(),
            rayon::current_num_threads(),
            paths.isa
        );
        if decoding {
            println!(
                "practical read bandwidth: {bw:.1} GB/s (256 MiB, {} threads)",
                rayon::current_num_threads()
            );
        }
        print_header();
    }
    let mut rows = Vec::new();
    for c in &cases {
        let row = run_case(c, args.reps, args.reference, peak, bw).with_context(|| {
            format!(
                "shape {:?} mask {:?} {:?} {:?} {}",
                c.shape,
                c.mask,
                c.dtype,
                c.pass,
                c.mods.name()
            )
        })?;
        // The limits measured again right after the case, the better of each kept: a row
        // is held to the best ceiling seen so far, not to one window that may have fallen
        // in a busy moment of a shared machine.
        limits = limits.best_of(&crate::peak::measure());
        let limit =
            crate::peak::RowLimit::of(&limits, &paths, c.dtype == Dtype::Bf16, row.useful_gflops);
        if args.json {
            println!("{}", limit.add_to(&row)?);
        } else {
            print_row(&row, &limit.cell());
        }
        rows.push(row);
    }
    if args.suite_mods && !args.json {
        print_mods_summary(&rows);
    }
    Ok(())
}
