//! Self-supervised pre-training of a small transformer ([`maskattn_candle::model::TinyLm`])
//! whose attention is maskattn's masked layer: masked-token (BERT-style, 80/10/10) or
//! next-token objective; documents *packed* into rows with a documents mask or *padded* with
//! a key padding mask; AdamW with its state in the open, linear warm-up and cosine decay,
//! global-norm clipping; held-out evaluation; checkpoints that a crash or a full disk never
//! spoil ([`checkpoint`]); exact resume (data, dropout and initialisation are drawn from
//! the seed and the step). A run that diverges stops without saving ([`Diverged`]).
//!
//! The data is the built-in task (no download; see [`corpus`]) or a UTF-8 text file,
//! tokenized by bytes or by a Hugging Face `tokenizer.json`.
//!
//! ```
//! use maskattn_candle::model::{LmConfig, Positions};
//! use maskattn_train::{Eval, Hooks, Outcome, RunSettings, Trainer, Vocab};
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = LmConfig {
//!     vocab: Vocab::Bytes.size(),
//!     d_model: 32,
//!     layers: 2,
//!     heads: 2,
//!     kv_heads: 2,
//!     d_ff: 128,
//!     max_len: 48,
//!     positions: Positions::Rotary,
//!     dropout: 0.0,
//!     softcap: None,
//!     sinks: false,
//! };
//! // `text: None`: the built-in task; the other settings as `maskattn train`'s defaults.
//! let run = RunSettings { steps: 20, batch: 4, seq_len: 48, eval_every: 10, ..RunSettings::default() };
//! let dir = tempfile::tempdir()?;
//! let mut trainer = Trainer::new(model, run, None, dir.path())?;
//!
//! // Callbacks for progress and evaluations; `trainer.stop_flag()` stops a run from outside.
//! struct Print;
//! impl Hooks for Print {
//!     fn on_eval(&mut self, e: &Eval, _secs: f64) {
//!         println!("step {}: held-out loss {:.3}, {} {:.2}", e.step, e.loss, e.metric_name, e.metric);
//!     }
//! }
//! let report = trainer.run(&mut Print)?;
//! assert_eq!(report.outcome, Outcome::Finished);
//! assert_eq!(trainer.state().step, 20);
//!
//! // The checkpoint in `dir` continues the run exactly, or serves the model.
//! let mut more = Trainer::resume(dir.path(), Some(30))?;
//! more.run(&mut ())?;
//! let (lm, vocab, state) = maskattn_train::open(dir.path())?;
//! assert_eq!(state.step, 30);
//! # let _ = (lm, vocab);
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod checkpoint;
pub mod corpus;
pub mod durable;
pub mod eval;
pub mod finite;
pub mod loss;
pub mod optim;
pub mod rng;
pub mod settings;
pub mod task;
pub mod trainer;
pub mod vocab;

pub use batch::{Batch, Layout, Objective};
pub use checkpoint::{Eval, State};
pub use loss::loss;
pub use settings::RunSettings;
pub use trainer::{
    build_model, init, open, Diverged, Hooks, Outcome, RunReport, StepReport, Trainer,
};
pub use vocab::{Vocab, VocabSpec};
