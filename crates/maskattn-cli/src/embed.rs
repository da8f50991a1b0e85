//! `maskattn embed` and `maskattn similarity`: sentence embeddings from a BERT-family
//! sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `1_Pooling/config.json`, `modules.json`), batched with padding and a key padding mask.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use maskattn_candle::bert::Bert;
use serde::Deserialize;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A sentence-transformers model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// One sentence per line (default: standard input).
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub query: String,
    /// One candidate per line.
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"text": "...", "embedding": [...]}` per line.
    Jsonl,
    /// The text, a tab, the values separated by tabs.
    Tsv,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
}

/// A sentence encoder: tokenizer, BERT, pooling, optional L2 normalisation.
pub struct Encoder {
    bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    max_len: usize,
}

/// One encoded sentence: its embedding, and whether it was cut to the model's length or
/// had no tokens at all (then the embedding is zero).
pub struct Embedded {
    pub vector: Vec<f32>,
    pub truncated: bool,
    pub no_tokens: bool,
}

impl Encoder {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: no such model folder", dir.display());
        }
        let bert = Bert::load(dir, &Device::Cpu)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            anyhow::anyhow!("{}: cannot load the tokenizer ({e})", tok_path.display())
        })?;
        // A tokenizer.json may pad or cut to a fixed length of its own; batching pads here (with
        // a key padding mask), and truncation follows the model's max_seq_length, with a warning.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
        let pooling = match std::fs::read_to_string(dir.join("1_Pooling/config.json")) {
            Err(_) => Pooling::Mean,
            Ok(t) => {
                let c: PoolingConfig =
                    serde_json::from_str(&t).context("1_Pooling/config.json is malformed")?;
                match (
                    c.pooling_mode_cls_token,
                    c.pooling_mode_mean_tokens,
                    c.pooling_mode_max_tokens,
                ) {
                    (true, false, false) => Pooling::Cls,
                    (false, _, true) => Pooling::Max,
                    (false, true, false) => Pooling::Mean,
                    _ => bail!(
                        "1_Pooling/config.json: only one of cls / mean / max pooling is supported"
                    ),
                }
            }
        };
        let normalize = std::fs::read_to_string(dir.join("modules.json"))
            .is_ok_and(|m| m.contains("models.Normalize"));
        let positions = bert.config().max_position_embeddings;
        let max_len = match std::fs::read_to_string(dir.join("sentence_bert_config.json")) {
            Err(_) => positions,
            Ok(t) => {
                let v: serde_json::Value =
                    serde_json::from_str(&t).context("sentence_bert_config.json is malformed")?;
                match &v["max_seq_length"] {
                    serde_json::Value::Null => positions,
                    // 0 would leave no room even for the final token that truncation keeps.
                    m => match m.as_u64() {
                        Some(n) if n >= 1 => (n as usize).min(positions),
                        _ => bail!("sentence_bert_config.json: max_seq_length is {m}; it must be a whole number of at least 1"),
                    },
                }
            }
        };
        Ok(Encoder {
            bert,
            tokenizer,
            pooling,
            normalize,
            max_len,
        })
    }

    /// Token ids with the special tokens, cut to the model's length (keeping the final one).
    fn tokens(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        let truncated = ids.len() > self.max_len;
        if truncated {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok((ids, truncated))
    }

    /// Embeddings in input order. Inside each batch, sentences of similar length are grouped
    /// (sorted by length) so that little of the work is padding.
    pub fn embed(&self, texts: &[String], batch_size: usize) -> Result<Vec<Embedded>> {
        let toks = texts
            .iter()
            .map(|t| self.tokens(t))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| toks[i].0.len());
        let mut out: Vec<Option<Embedded>> = (0..texts.len()).map(|_| None).collect();
        // A tokenizer without special tokens gives an empty line no tokens: there is nothing to
        // pool, and sentence-transformers' mean (a sum over max(count, 1e-9)) is the zero
        // vector. Such lines skip the model (a row of length 0 would pool to 0/0 = NaN).
        let (empty, order): (Vec<usize>, Vec<usize>) =
            order.into_iter().partition(|&i| toks[i].0.is_empty());
        for i in empty {
            out[i] = Some(Embedded {
                vector: vec![0.0; self.bert.config().hidden_size],
                truncated: false,
                no_tokens: true,
            });
        }
        let pad = self.bert.config().pad_token_id;
        for group in order.chunks(batch_size.max(1)) {
            let lmax = group.iter().map(|&i| toks[i].0.len()).max().unwrap_or(1);
            let mut ids = vec![pad; group.len() * lmax];
            let mut lengths = Vec::with_capacity(group.len());
            for (r, &i) in group.iter().enumerate() {
                let t = &toks[i].0;
                ids[r * lmax..r * lmax + t.len()].copy_from_slice(t);
                lengths.push(t.len());
            }
            let ids = Tensor::from_vec(ids, (group.len(), lmax), &Device::Cpu)?;
            let hidden = self.bert.forward(&ids, &lengths)?;
            let pooled = self.pool(&hidden, &lengths)?;
            for (r, &i) in group.iter().enumerate() {
                out[i] = Some(Embedded {
                    vector: pooled[r].clone(),
                    truncated: toks[i].1,
                    no_tokens: false,
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|e| e.expect("every sentence embedded"))
            .collect())
    }

    /// Pools `[B, L, H]` over each row's real tokens; L2-normalises when the model says so.
    fn pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<f32>>> {
        let (b, l, _) = hidden.dims3()?;
        let keep: Vec<f32> = (0..b)
            .flat_map(|r| (0..l).map(move |p| (p < lengths[r]) as u8 as f32))
            .collect();
        let keep = Tensor::from_vec(keep, (b, l, 1), hidden.device())?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let n = Tensor::from_vec(
                    lengths.iter().map(|&n| n as f32).collect(),
                    (b, 1),
                    hidden.device(),
                )?;
                hidden.broadcast_mul(&keep)?.sum(1)?.broadcast_div(&n)?
            }
            Pooling::Max => {
                // Padding gets a very negative value so that it never wins.
                let neg = ((keep.ones_like()? - &keep)? * -1e30)?;
                hidden.broadcast_add(&neg)?.max(1)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f32::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_dtype(DType::F32)?.to_vec2()?)
    }
}

fn read_lines(input: Option<&Path>) -> Result<Vec<String>> {
    let lines: std::io::Result<Vec<String>> = match input {
        Some(p) => std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .lines()
        .collect(),
        None => std::io::stdin().lock().lines().collect(),
    };
    // Only bad bytes are "not UTF-8"; any other failure (a folder given as the input) is
    // reported as what it is.
    let what = input.map_or("the input".to_string(), |p| p.display().to_string());
    lines.map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => anyhow::anyhow!("{what} is not UTF-8 text"),
        _ => anyhow::anyhow!("reading {what}: {e}"),
    })
}

fn warn_truncated(embs: &[Embedded], max_len: usize) {
    for (i, e) in embs.iter().enumerate() {
        if e.truncated {
            eprintln!(
                "warning: line {} is longer than {max_len} tokens and was truncated",
                i + 1
            );
        }
        if e.no_tokens {
            eprintln!(
                "warning: line {} has no tokens; its embedding is all zeros",
                i + 1
            );
        }
    }
}

pub fn embed(a: &EmbedArgs) -> Result<()> {
    let enc = Encoder::open(&a.model)?;
    let texts = read_lines(a.input.as_deref())?;
    let start = Instant::now();
    let embs = enc.embed(&texts, a.batch_size)?;
    let secs = start.elapsed().as_secs_f64();
    warn_truncated(&embs, enc.max_len);
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for (t, e) in texts.iter().zip(&embs) {
        match a.format {
            Format::Jsonl => writeln!(
                w,
                "{}",
                serde_json::json!({"text": t, "embedding": e.vector})
            )?,
            Format::Tsv => {
                let vals: Vec<String> = e.vector.iter().map(|v| v.to_string()).collect();
                writeln!(w, "{}\t{}", t.replace('\t', " "), vals.join("\t"))?
            }
        }
    }
    w.flush()?;
    eprintln!(
        "{} sentences in {:.2} s ({:.0} sentences/s)",
        texts.len(),
        secs,
        texts.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

pub fn similarity(a: &SimilarityArgs) -> Result<()> {
    let enc = Encoder::open(&a.model)?;
    let texts = read_lines(Some(&a.input))?;
    if texts.is_empty() {
        bail!("{} has no lines", a.input.display());
    }
    let q = enc.embed(std::slice::from_ref(&a.query), 1)?.remove(0);
    if q.no_tokens {
        eprintln!("warning: the query has no tokens; every line scores 0");
    }
    let q = q.vector;
    let embs = enc.embed(&texts, a.batch_size)?;
    warn_truncated(&embs, enc.max_len);
    let cos = |x: &[f32]| {
        let dot: f32 = x.iter().zip(&q).map(|(a, b)| a * b).sum();
        let n = x.iter().map(|v| v * v).sum::<f32>().sqrt()
            * q.iter().map(|v| v * v).sum::<f32>().sqrt();
        dot / n.max(1e-12)
    };
    let mut scored: Vec<(f32, usize)> = embs
        .iter()
        .enumerate()
        .map(|(i, e)| (cos(&e.vector), i))
        .collect();
    scored.sort_by(|x, y| y.0.total_cmp(&x.0));
    for (s, i) in scored.into_iter().take(a.top) {
        println!("{s:.4}\t{}", texts[i]);
    }
    Ok(())
}
