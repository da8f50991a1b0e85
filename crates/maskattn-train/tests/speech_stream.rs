//! Streaming inference chunk by chunk with a key/value cache gives the full-utterance
//! forward under `chunked(C, left)`, held to the accuracy rule of docs/design.md section 4:
//! against a golden forward in f64 written here from the model's definition (dense
//! attention with WeNet's chunk rule written out), the stream errs at most twice what the
//! full f32 forward errs, plus ε at the logits' scale. Several chunk sizes and histories,
//! lengths that leave the last chunk partial, `left = 0` and `left = all`.

use std::collections::HashMap;

use maskattn_train::task::speech::frontend::N_MELS;
use maskattn_train::task::speech::stream::Stream;
use maskattn_train::task::speech::synth::N_CLASSES;
use maskattn_train::task::speech::{Speech, SpeechSettings};
use maskattn_train::task::{Task, TaskTrainer, Trunk};
use maskattn_train::RunSettings;

const TRUNK: Trunk = Trunk {
    d_model: 32,
    layers: 2,
    heads: 4,
    d_ff: 64,
};

type Weights = HashMap<String, Vec<f64>>;

fn weights<T: Task>(t: &TaskTrainer<T>) -> Weights {
    let data = t.vars().data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            let x: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), x.into_iter().map(f64::from).collect())
        })
        .collect()
}

/// `x [n, in] · Wᵀ + b` with `W [out, in]` as candle's `Linear` holds it.
fn linear(w: &Weights, name: &str, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (wt, b) = (&w[&format!("{name}.weight")], &w[&format!("{name}.bias")]);
    let out = b.len();
    let inp = wt.len() / out;
    x.iter()
        .map(|r| {
            assert_eq!(r.len(), inp);
            (0..out)
                .map(|o| b[o] + (0..inp).map(|i| wt[o * inp + i] * r[i]).sum::<f64>())
                .collect()
        })
        .collect()
}

fn layer_norm(w: &Weights, name: &str, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (g, b) = (&w[&format!("{name}.weight")], &w[&format!("{name}.bias")]);
    x.iter()
        .map(|r| {
            let n = r.len() as f64;
            let mean = r.iter().sum::<f64>() / n;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            r.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) / (var + 1e-5).sqrt() * g[i] + b[i])
                .collect()
        })
        .collect()
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// WeNet's `subsequent_chunk_mask`: frame `i` sees frame `j` when `j`'s chunk is `i`'s or
/// one of the `left` before it (any before it when `left` is `None`).
fn visible(i: usize, j: usize, c: usize, left: Option<usize>) -> bool {
    let (ci, cj) = (i / c, j / c);
    cj <= ci && left.is_none_or(|l| ci - cj <= l)
}

/// The logits `[L][classes]` of one utterance, in f64.
fn golden(w: &Weights, feats: &[f32], start: usize, s: &SpeechSettings) -> Vec<Vec<f64>> {
    let l = feats.len() / N_MELS;
    let (d, h) = (TRUNK.d_model, TRUNK.heads);
    let dh = d / h;
    let rows: Vec<Vec<f64>> = feats
        .chunks(N_MELS)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let mut x = linear(w, "task.frame_in", &rows);
    for (t, r) in x.iter_mut().enumerate() {
        for (i, v) in r.iter_mut().enumerate() {
            // Vaswani et al.'s sinusoids: sin at even i, cos at odd, frequency 10000^(−2⌊i/2⌋/d).
            let a = (start + t) as f64 / 10000f64.powf((2 * (i / 2)) as f64 / d as f64);
            *v += if i % 2 == 0 { a.sin() } else { a.cos() };
        }
    }
    for b in 0..TRUNK.layers {
        let p = format!("encoder.blocks.{b}");
        let n = layer_norm(w, &format!("{p}.ln1"), &x);
        let (q, k, v) = (
            linear(w, &format!("{p}.q_proj"), &n),
            linear(w, &format!("{p}.k_proj"), &n),
            linear(w, &format!("{p}.v_proj"), &n),
        );
        let mut att = vec![vec![0f64; d]; l];
        for hd in 0..h {
            let cols = hd * dh..(hd + 1) * dh;
            for i in 0..l {
                let scores: Vec<Option<f64>> = (0..l)
                    .map(|j| {
                        visible(i, j, s.chunk, s.left).then(|| {
                            cols.clone().map(|c| q[i][c] * k[j][c]).sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                    })
                    .collect();
                let m = scores.iter().flatten().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - m).exp()))
                    .collect();
                let z: f64 = e.iter().sum();
                for c in cols.clone() {
                    att[i][c] = (0..l).map(|j| e[j] / z * v[j][c]).sum();
                }
            }
        }
        let o = linear(w, &format!("{p}.o_proj"), &att);
        for (r, o) in x.iter_mut().zip(&o) {
            r.iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
        let m = layer_norm(w, &format!("{p}.ln2"), &x);
        let f: Vec<Vec<f64>> = linear(w, &format!("{p}.fc1"), &m)
            .into_iter()
            .map(|r| r.into_iter().map(gelu_tanh).collect())
            .collect();
        let f = linear(w, &format!("{p}.fc2"), &f);
        for (r, o) in x.iter_mut().zip(&f) {
            r.iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
    }
    linear(w, "task.head", &layer_norm(w, "encoder.ln_f", &x))
}

fn max_err(a: &[f32], g: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(g.iter().flatten())
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn check(row_len: usize, chunk: usize, left: Option<usize>) {
    let settings = SpeechSettings {
        row_len,
        chunk,
        left,
        held_out: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let run = RunSettings {
        steps: 4,
        batch: 2,
        warmup: 1,
        eval_every: 100,
        ..RunSettings::default()
    };
    let task = Speech::new(settings.clone(), 9).unwrap();
    let mut t = TaskTrainer::new(task, TRUNK, run, dir.path()).unwrap();
    // A few steps, so the weights are not the initial ones.
    for _ in 0..4 {
        t.step().unwrap();
    }
    let b = t.task().train_batch(0, 77, 1).unwrap();
    let start = b.start[0] as usize;
    assert!(start > 0, "the row starts at a drawn position");
    let full: Vec<f32> = t
        .task()
        .logits(t.layers(), &t.hidden(&b).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut stream = Stream::new(t.task(), t.layers(), t.encoder(), start);
    let mut streamed = Vec::new();
    for piece in b.feats.chunks(chunk * N_MELS) {
        let out: Vec<f32> = stream
            .push(piece)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out.len(), piece.len() / N_MELS * N_CLASSES);
        streamed.extend(out);
        // The cache holds `left` chunks at most.
        if let Some(k) = left {
            assert!(stream.cached() <= k * chunk, "{} cached", stream.cached());
        }
    }
    assert_eq!(streamed.len(), full.len());
    let g = golden(&weights(&t), &b.feats, start, &settings);
    let scale = g.iter().flatten().fold(1f64, |m, v| m.max(v.abs()));
    let (e_stream, e_full) = (max_err(&streamed, &g), max_err(&full, &g));
    assert!(
        e_stream <= 2.0 * e_full + 1e-5 * scale,
        "L {row_len}, chunk {chunk}, left {left:?}: stream errs {e_stream:e}, full forward {e_full:e}"
    );
    // And the golden forward is the model's: the full forward is near it too.
    assert!(e_full <= 1e-3 * scale, "full forward errs {e_full:e}");
}

#[test]
fn streaming_is_the_masked_full_forward() {
    for (l, c, left) in [
        (37, 8, Some(2)),
        (45, 4, Some(1)),
        (33, 8, None),
        (29, 5, Some(0)),
        (32, 8, Some(2)),
        (19, 1, Some(3)),
        (26, 16, Some(1)),
    ] {
        check(l, c, left);
    }
}

#[test]
fn a_stream_refuses_chunks_it_cannot_take() {
    let settings = SpeechSettings {
        row_len: 16,
        chunk: 4,
        left: Some(1),
        held_out: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let t = TaskTrainer::new(
        Speech::new(settings, 1).unwrap(),
        TRUNK,
        RunSettings::default(),
        dir.path(),
    )
    .unwrap();
    let mut s = Stream::new(t.task(), t.layers(), t.encoder(), 0);
    let e = s.push(&vec![0.0; 5 * N_MELS]).unwrap_err();
    assert!(e.to_string().contains("1 to 4 frames"), "{e}");
    s.push(&vec![0.0; 3 * N_MELS]).unwrap();
    let e = s.push(&vec![0.0; 4 * N_MELS]).unwrap_err();
    assert!(e.to_string().contains("after the last"), "{e}");
}
