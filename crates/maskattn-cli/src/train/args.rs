//! The flags of `maskattn train`.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Train a task other than text: items (next-item recommendation), series
    /// (multivariate forecasting), speech (framewise phoneme classification, streaming) or
    /// vision (image classification). Without it: the text tasks (--objective, --text).
    #[arg(long, value_enum, conflicts_with = "resume")]
    pub task: Option<TaskArg>,
    /// --task series: train on this CSV file (a header row, one column per variate; a
    /// variate may start later, with empty cells before its first value) instead of
    /// generated series.
    #[arg(long, conflicts_with = "resume")]
    pub csv: Option<PathBuf>,
    /// --task series with --csv: the season length of the data, for the seasonal-naive
    /// forecast [default: 24].
    #[arg(long, conflicts_with = "resume")]
    pub period: Option<usize>,
    /// --task speech: frames (10 ms each) per chunk of the streaming mask
    /// `chunked(C, left)` — the latency [default: 8].
    #[arg(long, conflicts_with = "resume")]
    pub chunk: Option<usize>,
    /// --task speech: chunks of history each chunk sees; -1: all of them [default: 2].
    #[arg(long, allow_hyphen_values = true, conflicts_with = "resume")]
    pub left: Option<i64>,
    /// --task vision: the attention over the patch grid [default: natten].
    #[arg(long, value_enum, conflicts_with = "resume")]
    pub mask: Option<MaskArg>,
    /// --task vision: NATTEN's window k (odd; k × k patches) [default: 5] or Swin's window
    /// w (dividing the 24 × 24 patch grid) [default: 6].
    #[arg(long, conflicts_with = "resume")]
    pub window: Option<usize>,
    /// --task vision with --mask natten: the dilation [default: 1].
    #[arg(long, conflicts_with = "resume")]
    pub dilation: Option<usize>,
    /// mlm: predict masked tokens (bidirectional attention); clm: predict the next token (causal).
    #[arg(long, value_enum, default_value = "clm", conflicts_with = "resume")]
    pub objective: ObjectiveArg,
    /// packed: several documents per row with a documents mask; padded: one per row with key padding.
    #[arg(long, value_enum, default_value = "packed", conflicts_with = "resume")]
    pub layout: LayoutArg,
    /// Train on this UTF-8 text (paragraphs are documents) instead of the built-in task.
    #[arg(long, conflicts_with = "resume")]
    pub text: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (needs --text); default: bytes.
    #[arg(long, conflicts_with = "resume")]
    pub tokenizer: Option<PathBuf>,
    /// Checkpoint folder (written at every evaluation, at the end and on Ctrl-C).
    #[arg(long, default_value = "runs/default", conflicts_with = "resume")]
    pub out: PathBuf,
    /// Continue the run saved in this checkpoint folder (its settings are kept; --steps may
    /// extend it). The run's settings cannot be given with it: a flag that would be ignored
    /// is refused, naming it.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Optimisation steps in all [default: 500; on --resume: the checkpoint's, or more to extend it].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per batch [default: 16; --task vision: 8].
    #[arg(long, conflicts_with = "resume")]
    pub batch: Option<usize>,
    #[arg(long, default_value_t = 128, conflicts_with = "resume")]
    pub seq_len: usize,
    /// Model width [default: 128; --task: 64].
    #[arg(long, conflicts_with = "resume")]
    pub d_model: Option<usize>,
    /// Transformer blocks [default: 3; --task: 2].
    #[arg(long, conflicts_with = "resume")]
    pub layers: Option<usize>,
    /// Attention heads [default: 4].
    #[arg(long, conflicts_with = "resume")]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long, conflicts_with = "resume")]
    pub kv_heads: Option<usize>,
    /// How the model knows positions: rotary, learned embeddings, ALiBi (fixed standard
    /// slopes) or T5 relative biases (a trainable table per layer, 32 buckets up to 128).
    #[arg(long, value_enum, default_value = "rotary", conflicts_with = "resume")]
    pub positions: PositionsArg,
    #[arg(long, default_value_t = 0.0, conflicts_with = "resume")]
    pub dropout: f32,
    /// Soft-cap the attention scores at C: `C · tanh(score / C)`.
    #[arg(long, value_name = "C", conflicts_with = "resume")]
    pub softcap: Option<f32>,
    /// An attention sink (a trainable logit in every softmax's sum) per head and layer.
    #[arg(long, conflicts_with = "resume")]
    pub sinks: bool,
    #[arg(long, default_value_t = 3e-3, conflicts_with = "resume")]
    pub lr: f64,
    #[arg(long, default_value_t = 60, conflicts_with = "resume")]
    pub warmup: u64,
    /// Final learning rate as a fraction of --lr.
    #[arg(long, default_value_t = 0.1, conflicts_with = "resume")]
    pub min_lr_ratio: f64,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0, conflicts_with = "resume")]
    pub clip: f64,
    #[arg(long, default_value_t = 0.01, conflicts_with = "resume")]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 100, conflicts_with = "resume")]
    pub eval_every: u64,
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    pub seed: u64,
    /// Stop after this many steps of this invocation (the schedule still spans --steps);
    /// for testing resume.
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
    /// No progress bar (also when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Attention in candle ops with the scores materialised (the reference path, as
    /// `maskattn_candle::reference`) instead of the maskattn kernels, to compare step times.
    #[arg(long, alias = "plain-attention")]
    pub reference_attention: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskArg {
    /// Next-item recommendation: causal attention over a user's history (SASRec-style).
    Items,
    /// Multivariate forecasting: patches of several series packed with a documents mask.
    Series,
    /// Framewise phoneme classification of synthesised speech under WeNet's chunk mask.
    Speech,
    /// Image classification: patches of generated images, ViT-style, under --mask.
    Vision,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskArg {
    /// Every patch sees every patch.
    Full,
    /// NATTEN neighbourhood attention: a --window × --window window (centre clamped at the
    /// borders), --dilation apart.
    Natten,
    /// Swin windows of --window × --window patches, shifted by half a window on odd layers.
    Swin,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectiveArg {
    /// BERT-style: predict masked tokens, attention both ways.
    Mlm,
    /// GPT-style: predict the next token, causal attention.
    Clm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutArg {
    /// Several documents per row with a documents mask.
    Packed,
    /// One document per row, padded, with a key padding mask.
    Padded,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionsArg {
    Rotary,
    Learned,
    Alibi,
    T5,
}
