//! Checkpoints: a folder with `model.safetensors`, `optimizer.safetensors`, the tokenizer
//! when it is a file, and `config.json` (model and run settings, step, history, and a hash
//! of every other file). Each file is written to a temporary name and renamed, and
//! `config.json` last, so a crash leaves either the old checkpoint or the new one; a file
//! that does not match its hash is reported as a corrupt checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use maskattn_candle::model::LmConfig;
use serde::{Deserialize, Serialize};

use super::batch::{Layout, Objective};
use super::vocab::VocabSpec;

/// The settings a run was started with (a resumed run keeps them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub objective: Objective,
    pub layout: Layout,
    /// `None`: the built-in task.
    pub text: Option<PathBuf>,
    pub seed: u64,
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub clip: f64,
    pub weight_decay: f64,
    pub eval_every: u64,
}

/// One evaluation on the held-out split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub step: u64,
    pub loss: f64,
    /// Answer accuracy (built-in task), masked-token accuracy (text, MLM) or perplexity
    /// (text, CLM); `metric_name` says which.
    pub metric: f64,
    pub metric_name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub model: LmConfig,
    pub vocab: VocabSpec,
    pub run: RunSettings,
    /// Updates done.
    pub step: u64,
    /// Training loss per step.
    pub losses: Vec<f32>,
    pub evals: Vec<Eval>,
    /// FNV-1a of `model.safetensors` and `optimizer.safetensors`.
    pub hashes: HashMap<String, String>,
}

pub const FORMAT: u32 = 1;

fn fnv(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// f32 tensors as safetensors bytes, names sorted.
fn tensors_bytes(t: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let data = names
        .iter()
        .map(|n| {
            let x = t[*n]
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((
                t[*n].dims().to_vec(),
                x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = names
        .iter()
        .zip(&data)
        .map(|(n, (shape, bytes))| {
            Ok((
                n.as_str(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Writes a checkpoint into `dir` (created if needed).
pub fn save(
    dir: &Path,
    state: &mut State,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    state.hashes.clear();
    for (name, t) in [
        ("model.safetensors", model),
        ("optimizer.safetensors", optimizer),
    ] {
        let bytes = tensors_bytes(t)?;
        state.hashes.insert(name.into(), fnv(&bytes));
        write_atomic(&dir.join(name), &bytes)?;
    }
    if let (Some(src), VocabSpec::Hf { file }) = (tokenizer, &state.vocab) {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        state.hashes.insert(file.clone(), fnv(&bytes));
        write_atomic(&dir.join(file), &bytes)?;
    }
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )
}

/// A checkpoint read back.
pub struct Loaded {
    pub state: State,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

/// Reads a checkpoint: its state, model tensors and optimizer tensors.
pub fn load(dir: &Path) -> Result<Loaded> {
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).with_context(|| {
        format!(
            "{} is not a checkpoint (no readable config.json)",
            dir.display()
        )
    })?;
    let state: State = serde_json::from_str(&text)
        .with_context(|| format!("{}: config.json is corrupt", dir.display()))?;
    if state.format != FORMAT {
        bail!(
            "{}: checkpoint format {} (this program reads {FORMAT})",
            dir.display(),
            state.format
        );
    }
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("{}: {name} is missing", dir.display()))?;
        match state.hashes.get(name) {
            Some(h) if *h == fnv(&bytes) => {}
            _ => bail!(
                "{}: {name} is corrupt or from another checkpoint (hash mismatch)",
                dir.display()
            ),
        }
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{}: {name} is corrupt", dir.display()))
    };
    let model = read("model.safetensors")?;
    let optimizer = read("optimizer.safetensors")?;
    if let VocabSpec::Hf { file } = &state.vocab {
        let bytes = std::fs::read(dir.join(file))
            .with_context(|| format!("{}: {file} is missing", dir.display()))?;
        if state.hashes.get(file) != Some(&fnv(&bytes)) {
            bail!(
                "{}: {file} is corrupt or from another checkpoint (hash mismatch)",
                dir.display()
            );
        }
    }
    Ok(Loaded {
        state,
        model,
        optimizer,
    })
}

/// Copies `tensors` into the model's variables, checking that every name and shape matches.
pub fn restore(vars: &candle_nn::VarMap, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let data = vars.data().lock().unwrap();
    for (name, var) in data.iter() {
        let Some(t) = tensors.get(name) else {
            bail!("checkpoint has no `{name}`: it belongs to another model configuration");
        };
        if t.dims() != var.dims() {
            bail!(
                "checkpoint `{name}` has shape {:?}, the model {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(t)?;
    }
    if tensors.len() != data.len() {
        bail!(
            "checkpoint has {} tensors, the model {}",
            tensors.len(),
            data.len()
        );
    }
    Ok(())
}
