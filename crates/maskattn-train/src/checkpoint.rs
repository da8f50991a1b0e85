//! Checkpoints. A checkpoint folder `DIR` holds `config.json` (model and run settings, step,
//! history, a hash of every file and of itself) and a sub-folder `ckpt-NNNNNN` with
//! `model.safetensors`, `optimizer.safetensors` and the tokenizer when it is a file.
//!
//! A checkpoint is one unit. A save writes a *new* sub-folder (every file flushed to the
//! disk), then a new `config.json` that names it, which replaces the old one with a single
//! rename: that rename is the switch. Until it happens `DIR` is the previous checkpoint,
//! untouched; after it, the new one; a failure at any point leaves one of the two, complete
//! and resumable (tested by failing every step of a save). The previous sub-folder is
//! removed after the switch; a failed save removes what it wrote.
//!
//! Reading checks `config.json` against its own hash (settings are not edited by hand), then
//! every setting, then each file against its hash. Format 1 checkpoints (the files beside
//! `config.json`, no hash of the config) are still read; the first save into such a folder
//! writes format 2 and removes the format 1 files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use maskattn_candle::model::LmConfig;
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::finite;
pub use crate::settings::RunSettings;
use crate::vocab::VocabSpec;

/// One evaluation on the held-out split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    pub step: u64,
    #[serde(with = "finite::f64")]
    pub loss: f64,
    /// Answer accuracy (built-in task), masked-token accuracy (text, MLM) or perplexity
    /// (text, CLM); `metric_name` says which.
    #[serde(with = "finite::f64")]
    pub metric: f64,
    pub metric_name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// FNV-1a of `config.json` as written with this value all zeros (format 2). First, so
    /// that it is found before any other text of the file.
    #[serde(default)]
    pub config_hash: String,
    pub format: u32,
    /// The sub-folder that holds this checkpoint's files (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<String>,
    pub model: LmConfig,
    pub vocab: VocabSpec,
    pub run: RunSettings,
    /// Updates done.
    pub step: u64,
    /// Training loss per step.
    #[serde(with = "finite::vec_f32")]
    pub losses: Vec<f32>,
    pub evals: Vec<Eval>,
    /// FNV-1a of every file in the sub-folder, by name.
    pub hashes: BTreeMap<String, String>,
    /// A run of a [`crate::task::Task`] (absent for the text tasks): its name, settings
    /// and encoder, from which [`crate::task::TaskTrainer::resume`] rebuilds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<crate::task::TaskSpec>,
}

pub const FORMAT: u32 = 2;
const CONFIG: &str = "config.json";
const HASH_KEY: &str = "\"config_hash\": \"";
const ZERO_HASH: &str = "0000000000000000";
const SUB_PREFIX: &str = "ckpt-";

fn fnv(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Where the config hash sits in the text of `config.json`.
fn hash_range(text: &str) -> Option<std::ops::Range<usize>> {
    let at = text.find(HASH_KEY)? + HASH_KEY.len();
    text.get(at..at + ZERO_HASH.len())
        .map(|_| at..at + ZERO_HASH.len())
}

/// The text of `config.json` for `state`, with its own hash filled in.
fn config_text(state: &mut State) -> Result<String> {
    state.config_hash = ZERO_HASH.into();
    let mut text = serde_json::to_string_pretty(state)?;
    let range = hash_range(&text).context("config_hash is written first")?;
    let h = fnv(text.as_bytes());
    text.replace_range(range, &h);
    state.config_hash = h;
    Ok(text)
}

/// Whether `text` (format 2) matches the hash it carries.
fn config_hash_ok(text: &str) -> bool {
    let Some(range) = hash_range(text) else {
        return false;
    };
    let mut zeroed = text.to_string();
    let stored = zeroed[range.clone()].to_string();
    zeroed.replace_range(range, ZERO_HASH);
    fnv(zeroed.as_bytes()) == stored
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

/// The sub-folders `ckpt-N` in `dir`, with their numbers.
fn sub_folders(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix(SUB_PREFIX)?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .collect()
}

/// What a checkpoint holds besides its state.
pub struct Contents<'a> {
    pub model: &'a HashMap<String, Tensor>,
    pub optimizer: &'a HashMap<String, Tensor>,
    /// The bytes of the `tokenizer.json` (for a Hugging Face vocabulary).
    pub tokenizer: Option<&'a [u8]>,
}

/// Writes a checkpoint into `dir` (created if needed); `state` takes the new file names and
/// hashes. See the module documentation for what a failure leaves.
pub fn save(dir: &Path, state: &mut State, contents: &Contents) -> Result<()> {
    save_probed(dir, state, contents, &mut |_| Ok(()))
}

/// [`save`], calling `probe(what)` before each step that writes to the disk; an error from
/// it fails the save there (how the tests fail every step).
fn save_probed(
    dir: &Path,
    state: &mut State,
    contents: &Contents,
    probe: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> Result<()> {
    let config = dir.join(CONFIG);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    durable::refuse_special(&config)?;
    // A format 1 checkpoint here: its files go once the new one is in place.
    let old_flat = fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["format"] == 1);
    let n = sub_folders(dir)
        .iter()
        .map(|(n, _)| n + 1)
        .max()
        .unwrap_or(1);
    let sub_name = format!("{SUB_PREFIX}{n:06}");
    let sub = dir.join(&sub_name);
    let mut next = state.clone();
    next.format = FORMAT;
    next.files = Some(sub_name);
    next.hashes.clear();
    let written = (|| -> Result<()> {
        probe("folder")?;
        fs::create_dir(&sub).with_context(|| format!("creating {}", sub.display()))?;
        let mut files = vec![
            (
                "model.safetensors".to_string(),
                tensors_bytes(contents.model)?,
            ),
            (
                "optimizer.safetensors".to_string(),
                tensors_bytes(contents.optimizer)?,
            ),
        ];
        match (&next.vocab, contents.tokenizer) {
            (VocabSpec::Hf { file }, Some(bytes)) => files.push((file.clone(), bytes.to_vec())),
            (VocabSpec::Hf { file }, None) => bail!("the checkpoint needs its {file}"),
            (VocabSpec::Bytes, _) => {}
        }
        for (name, bytes) in &files {
            next.hashes.insert(name.clone(), fnv(bytes));
            probe(name)?;
            durable::write_new(&sub.join(name), bytes)?;
        }
        probe("flush folder")?;
        durable::sync_dir(&sub)?;
        let text = config_text(&mut next)?;
        durable::replace_with(&config, |tmp| {
            probe(CONFIG)?;
            durable::write_new(tmp, text.as_bytes())?;
            Ok(probe("switch")?)
        })
    })();
    if let Err(e) = written {
        // Not switched: the previous checkpoint is the one; what this save wrote goes.
        let _ = fs::remove_dir_all(&sub);
        return Err(e.context(format!(
            "saving the checkpoint in {} (the previous one, if any, is kept)",
            dir.display()
        )));
    }
    *state = next;
    probe("flush")
        .map_err(anyhow::Error::from)
        .and_then(|()| durable::sync_dir(dir))
        .with_context(|| format!("saved {}, but not flushed to the disk", dir.display()))?;
    // The switch is done: older checkpoints (or leftovers of a crash) go. Best effort: a
    // leftover is harmless, and the next save tries again.
    for (_, p) in sub_folders(dir) {
        if p != sub {
            let _ = fs::remove_dir_all(p);
        }
    }
    if old_flat {
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "tokenizer.json",
        ] {
            let _ = fs::remove_file(dir.join(f));
        }
    }
    Ok(())
}

/// A checkpoint read back.
pub struct Loaded {
    pub state: State,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// The folder that holds the checkpoint's files (the tokenizer among them).
    pub files: PathBuf,
    /// The tokenizer file's bytes (a Hugging Face vocabulary).
    pub tokenizer: Option<Vec<u8>>,
}

/// Reads a checkpoint: its state (checked), model tensors and optimizer tensors.
pub fn load(dir: &Path) -> Result<Loaded> {
    let cfg = dir.join(CONFIG);
    let text = fs::read_to_string(&cfg).with_context(|| {
        format!(
            "{} is not a checkpoint (no readable config.json)",
            dir.display()
        )
    })?;
    let corrupt = || format!("{}: config.json is corrupt", dir.display());
    let value: serde_json::Value = serde_json::from_str(&text).with_context(corrupt)?;
    match value["format"].as_u64() {
        Some(1) => {}
        Some(2) if config_hash_ok(&text) => {}
        Some(2) => bail!(
            "{}: config.json does not match its hash: it was edited or damaged (a checkpoint's settings cannot be changed by hand)",
            dir.display()
        ),
        Some(f) => bail!(
            "{}: checkpoint format {f} (this program reads 1 and {FORMAT})",
            dir.display()
        ),
        None => bail!("{}: config.json has no format", dir.display()),
    }
    let state: State = serde_json::from_str(&text).with_context(corrupt)?;
    check_state(&state).with_context(|| format!("{}: config.json", dir.display()))?;
    let files = match (&state.files, state.format) {
        (_, 1) => dir.to_path_buf(),
        (Some(sub), _) if is_plain_name(sub) => dir.join(sub),
        _ => bail!("{}: config.json names no files", dir.display()),
    };
    let read = |name: &str| -> Result<Vec<u8>> {
        let bytes = fs::read(files.join(name))
            .with_context(|| format!("{}: {name} is missing", files.display()))?;
        if state.hashes.get(name) != Some(&fnv(&bytes)) {
            bail!(
                "{}: {name} is corrupt or from another checkpoint (hash mismatch)",
                files.display()
            );
        }
        Ok(bytes)
    };
    let tensors = |name: &str| -> Result<HashMap<String, Tensor>> {
        candle_core::safetensors::load_buffer(&read(name)?, &Device::Cpu)
            .with_context(|| format!("{}: {name} is corrupt", files.display()))
    };
    let model = tensors("model.safetensors")?;
    let optimizer = tensors("optimizer.safetensors")?;
    let tokenizer = match &state.vocab {
        VocabSpec::Hf { file } if is_plain_name(file) => Some(read(file)?),
        VocabSpec::Hf { file } => bail!("{}: tokenizer file `{file}`", corrupt()),
        VocabSpec::Bytes => None,
    };
    Ok(Loaded {
        state,
        model,
        optimizer,
        files,
        tokenizer,
    })
}

/// A file name without a folder in it (a checkpoint never points outside itself).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// The rules a fresh run's flags obey, and the history's own consistency.
fn check_state(s: &State) -> Result<()> {
    s.run.validate()?;
    crate::settings::validate_model(&s.model, &s.run)?;
    if s.step > s.run.steps || s.losses.len() as u64 != s.step {
        bail!(
            "step {} of {} with {} losses recorded",
            s.step,
            s.run.steps,
            s.losses.len()
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Layout, Objective};
    use maskattn_candle::model::Positions;

    fn state(step: u64, tokenizer: bool) -> State {
        State {
            config_hash: String::new(),
            format: FORMAT,
            files: None,
            model: LmConfig {
                vocab: 259,
                d_model: 8,
                layers: 1,
                heads: 2,
                kv_heads: 2,
                d_ff: 16,
                max_len: 16,
                positions: Positions::Rotary,
                dropout: 0.0,
                softcap: None,
                sinks: false,
            },
            vocab: if tokenizer {
                VocabSpec::Hf {
                    file: "tokenizer.json".into(),
                }
            } else {
                VocabSpec::Bytes
            },
            run: RunSettings {
                objective: Objective::Clm,
                layout: Layout::Packed,
                text: None,
                seed: 0,
                steps: 10,
                batch: 2,
                seq_len: 16,
                lr: 1e-3,
                warmup: 2,
                min_lr_ratio: 0.1,
                clip: 1.0,
                weight_decay: 0.01,
                eval_every: 5,
            },
            step,
            losses: vec![1.5; step as usize],
            evals: vec![Eval {
                step,
                loss: 2.0,
                metric: f64::INFINITY,
                metric_name: "perplexity".into(),
            }],
            hashes: BTreeMap::new(),
            task: None,
        }
    }

    fn tensors(prefix: &str, x: f32) -> HashMap<String, Tensor> {
        HashMap::from([(
            format!("{prefix}w"),
            Tensor::new(&[x, x + 1.0], &Device::Cpu).unwrap(),
        )])
    }

    /// Saves the checkpoint of step `step` (weights `step`, optimizer `-step`).
    fn save_step(
        dir: &Path,
        step: u64,
        probe: &mut dyn FnMut(&str) -> std::io::Result<()>,
    ) -> Result<()> {
        let (m, o) = (tensors("", step as f32), tensors("m.", -(step as f32)));
        let tok = format!("tokenizer of step {step}").into_bytes();
        let contents = Contents {
            model: &m,
            optimizer: &o,
            tokenizer: Some(&tok),
        };
        save_probed(dir, &mut state(step, true), &contents, probe)
    }

    /// The checkpoint in `dir` is complete, and is the one of `step` in every file.
    fn holds(dir: &Path) -> u64 {
        let l = load(dir).unwrap();
        let step = l.state.step;
        let w: Vec<f32> = l.model["w"].to_vec1().unwrap();
        let m: Vec<f32> = l.optimizer["m.w"].to_vec1().unwrap();
        assert_eq!(w[0], step as f32);
        assert_eq!(m[0], -(step as f32));
        assert_eq!(
            l.tokenizer.unwrap(),
            format!("tokenizer of step {step}").as_bytes()
        );
        assert!(l.state.evals[0].metric.is_infinite());
        step
    }

    /// Every step of a save fails in turn, as an error (cleaned up) and as a crash (the
    /// process dies there: nothing cleaned up): the folder always holds the previous
    /// checkpoint or the new one, complete; after an error nothing of the new one is left.
    #[test]
    fn a_save_failing_at_any_point_leaves_one_complete_checkpoint() {
        let mut steps = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        save_step(dir.path(), 1, &mut |what| {
            steps.push(what.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            steps,
            [
                "folder",
                "model.safetensors",
                "optimizer.safetensors",
                "tokenizer.json",
                "flush folder",
                "config.json",
                "switch",
                "flush"
            ]
        );
        for (k, at) in steps.iter().enumerate() {
            for crash in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                save_step(dir.path(), 1, &mut |_| Ok(())).unwrap();
                let before: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
                let mut probe = |what: &str| {
                    if what != at {
                        return Ok(());
                    }
                    if crash {
                        panic!("crash at {what}");
                    }
                    Err(std::io::Error::other(format!("disk full at {what}")))
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    save_step(dir.path(), 2, &mut probe)
                }));
                assert!(r.is_err() || r.unwrap().is_err(), "{at}: the save fails");
                let step = holds(dir.path());
                let switched = k >= steps.iter().position(|s| s == "flush").unwrap();
                assert_eq!(step, if switched { 2 } else { 1 }, "failed at {at}");
                if !crash && !switched {
                    let after: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
                    assert_eq!(after.len(), before.len(), "{at}: leftovers");
                }
                // The next save succeeds and clears whatever a crash left.
                save_step(dir.path(), 3, &mut |_| Ok(())).unwrap();
                assert_eq!(holds(dir.path()), 3);
                let names: Vec<String> = fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                assert_eq!(names.len(), 2, "{at}: {names:?}");
            }
        }
    }

    #[test]
    fn an_edited_config_or_a_foreign_file_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        save_step(dir.path(), 4, &mut |_| Ok(())).unwrap();
        let cfg = dir.path().join(CONFIG);
        let text = fs::read_to_string(&cfg).unwrap();
        fs::write(&cfg, text.replace("\"steps\": 10", "\"steps\": 11")).unwrap();
        let e = format!("{:#}", load(dir.path()).err().unwrap());
        assert!(e.contains("does not match its hash"), "{e}");
        // A consistent hash on an out-of-range setting (written by another tool): the
        // settings are checked too.
        let mut bad = state(4, true);
        bad.run.seq_len = 1;
        bad.files = Some("../elsewhere".into());
        fs::write(&cfg, config_text(&mut bad).unwrap()).unwrap();
        let e = format!("{:#}", load(dir.path()).err().unwrap());
        assert!(e.contains("--seq-len 1: must be at least 8"), "{e}");
        let mut bad = state(4, true);
        bad.files = Some("../elsewhere".into());
        fs::write(&cfg, config_text(&mut bad).unwrap()).unwrap();
        let e = format!("{:#}", load(dir.path()).err().unwrap());
        assert!(e.contains("names no files"), "{e}");
    }

    /// Format 1 (files beside `config.json`) is read, and replaced by the first save.
    #[test]
    fn format_1_checkpoints_are_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(4, false);
        s.format = 1;
        let (m, o) = (tensors("", 4.0), tensors("m.", -4.0));
        for (name, t) in [("model.safetensors", &m), ("optimizer.safetensors", &o)] {
            let bytes = tensors_bytes(t).unwrap();
            s.hashes.insert(name.into(), fnv(&bytes));
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        let text = serde_json::to_string_pretty(&s).unwrap();
        fs::write(dir.path().join(CONFIG), text).unwrap();
        let mut l = load(dir.path()).unwrap();
        assert_eq!(l.state.step, 4);
        assert_eq!(l.files, dir.path());
        let contents = Contents {
            model: &l.model,
            optimizer: &l.optimizer,
            tokenizer: None,
        };
        save(dir.path(), &mut l.state, &contents).unwrap();
        assert_eq!(l.state.format, FORMAT);
        assert!(!dir.path().join("model.safetensors").exists());
        assert_eq!(load(dir.path()).unwrap().state.step, 4);
    }
}
