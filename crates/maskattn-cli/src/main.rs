//! The `maskattn` command-line program.

// Doc comments here are clap's help text, where `[MASK]` is the literal token, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

mod alloc_count;
mod attend;
mod bench;
mod bench_layer;
mod demo;
mod embed;
mod forecast;
mod infer;
mod mask_expr;
mod measure;
/// Every program output file goes through this module (attend, attention-map, tensors).
mod output;
mod peak;
mod stream;
mod tensors;
mod train;

use std::process::ExitCode;

#[global_allocator]
static ALLOC: alloc_count::Counting = alloc_count::Counting;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "maskattn",
    version,
    about = "Exact masked multi-head attention on the CPU"
)]
struct Cli {
    /// Worker threads (default: all cores; at most 4 × the cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pre-train a small transformer self-supervised (masked-token or next-token) on the
    /// built-in task or a text file, with checkpoints, evaluation and a loss curve.
    // Boxed: the largest set of flags by far (clippy::large_enum_variant).
    Train(Box<train::TrainArgs>),
    /// Forecast the next values of a CSV file's series with a `train --task series` checkpoint.
    Forecast(forecast::ForecastArgs),
    /// Top candidates for each [MASK] in a text (an mlm checkpoint).
    FillMask(infer::FillMaskArgs),
    /// Continue a prompt with the KV cache (a clm checkpoint).
    Generate(infer::GenerateArgs),
    /// Heat maps of every layer's and head's attention weights on a text.
    AttentionMap(infer::AttentionMapArgs),
    /// Sentence embeddings from a BERT-family sentence-transformers folder (JSONL or TSV).
    Embed(embed::EmbedArgs),
    /// Rank lines by cosine similarity to a query (sentence embeddings).
    Similarity(embed::SimilarityArgs),
    /// Masked attention forward (and backward, given `dout`) on tensors from a safetensors file.
    Attend(attend::AttendArgs),
    /// Every mask kind on a built-in shape: fast kernels against the f64 reference, with
    /// the accuracy rule, the work each mask saves, and the time taken.
    Demo(demo::DemoArgs),
    /// Time the kernels: median ms, GFLOP/s, fraction of the machine's practical peak,
    /// tiles skipped, extra memory (`--suite` for the whole grid).
    Bench(bench::BenchArgs),
    /// The candle layer and attention op against the same in plain candle ops.
    BenchLayer(bench_layer::BenchLayerArgs),
    /// Stream a WAV file (or a synthesised utterance) through a speech checkpoint chunk by
    /// chunk with a key/value cache, printing each chunk's phonemes as they come.
    Stream(stream::StreamArgs),
}

fn main() -> ExitCode {
    default_sigpipe();
    alloc_count::keep_freed_memory();
    // candle runs its element-wise ops on a thread pool of its own, whose threads spin
    // between ops; beside rayon's (matrix products, attention kernels, fused ops) they only
    // compete for the same cores, and on a busy machine the spinning took most of the time.
    // One thread leaves that pool without workers: those ops run on the calling thread.
    // Set before any thread exists; a value in the environment is kept.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain of causes, no backtrace: these are user errors.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Output piped into a reader that stops early (`maskattn bench | head -1`) ends the program
/// as it ends `cat` or `grep`: killed by SIGPIPE, silently — status 141 in a shell. Rust
/// ignores SIGPIPE by default, which turns the closed pipe into an error that `println!`
/// reports by panicking (exit 101). Not exit 0: under `set -o pipefail` a shell should still
/// see that the output was cut short, and every writer (tables, progress, reports) gets the
/// same behaviour without a check of its own.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in `main`, before any other thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        // More threads than cores only adds switching; far more spends seconds creating them.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let most = 4 * cores;
        if n == 0 || n > most {
            anyhow::bail!(
                "--threads {n}: must be between 1 and {most} (4 × the {cores} cores of this machine)"
            );
        }
    }
    // The command runs on one of the pool's threads, not beside them: then each parallel
    // step (many in a training step) starts from a worker, which keeps working on it,
    // instead of waking the workers and putting the main thread to sleep until they are
    // done — as PyTorch's OpenMP regions use the calling thread. Training steps were 12%
    // faster so (docs/performance.md, "The command on the pool's threads"). 8 MiB of stack,
    // as the main thread has (candle's backward walks its graph recursively). `0`:
    // `RAYON_NUM_THREADS`, else one thread per core.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .stack_size(8 << 20)
        .build()?;
    pool.install(|| dispatch(&cli))
}

fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Train(a) => train::run(a),
        Command::Forecast(a) => forecast::run(a),
        Command::FillMask(a) => infer::fill_mask(a),
        Command::Generate(a) => infer::generate(a),
        Command::AttentionMap(a) => infer::attention_map(a),
        Command::Attend(a) => attend::run(a),
        Command::Embed(a) => embed::embed(a),
        Command::Similarity(a) => embed::similarity(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchLayer(a) => bench_layer::run(a),
        Command::Stream(a) => stream::run(a),
    }
}
