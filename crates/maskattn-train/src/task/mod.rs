//! Tasks beyond text: a [`Task`] supplies its data, its input embedding, its head, loss and
//! metric, and the mask; [`TaskTrainer`] trains the shared transformer encoder
//! ([`Encoder`]) on it with the same optimiser, checkpoints, exact resume and [`Hooks`] as
//! the text [`Trainer`](crate::Trainer).
//!
//! Four tasks come with the crate: [`items`] (next-item recommendation, SASRec-style),
//! [`series`] (multivariate forecasting on patches, PatchTST/Moirai-style), [`speech`]
//! (framewise phoneme classification by a streaming encoder, WeNet's chunk mask) and
//! [`vision`] (image classification on patches under full, NATTEN or Swin attention,
//! ViT-style). A task of your
//! own implements [`Task`]; `tests/task_trait.rs` holds one written outside the crate.
//!
//! A step: [`Task::train_batch`] draws the batch of step `n` from the seed and `n` alone;
//! [`Task::input`] embeds it (`[B, L, d_model]`, token ids or continuous vectors through
//! the task's own layers) with the mask over `[B, heads, L, L]` (or masks taking turns
//! over the layers) and, optionally, a dense
//! additive score bias `[B|1, heads|1, L, L]` that may carry gradients to the task's
//! parameters; the encoder runs; [`Task::loss`] turns its output into the loss. The
//! held-out figures come from [`Task::evaluate`], which runs the model through a closure;
//! the pictures worth drawing after a run from [`Task::figures`].
//!
//! [`Hooks`]: crate::Hooks

mod api;
pub mod encoder;
pub mod figure;
pub mod items;
mod runner;
pub mod series;
pub mod series_csv;
pub mod series_forecast;
mod spec;
pub mod speech;
pub mod vision;

pub use api::{Input, Task, TaskEval};
pub use encoder::{Encoder, Trunk};
pub use figure::{Figure, Line, Panel, Role};
pub use runner::TaskTrainer;
pub use spec::TaskSpec;
