//! Training data: the built-in key–value recall task (generated, no download) or any UTF-8
//! text file, split into documents, with a held-out part.
//!
//! The built-in task: a document lists a few keys with digit values, then asks for each of
//! them again in another order, e.g. `a3 f7 c1|f7 c1 a3`. Each answer digit depends on a token far away (the
//! definition of its key), so the model has to attend to it — and what it may attend to is
//! what the mask says. The score is the fraction of answer digits predicted exactly.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::rng::Rng;
use super::vocab::Vocab;

/// One document: its tokens and, for the built-in task, the positions of answer tokens.
#[derive(Clone, Debug)]
pub struct Doc {
    pub tokens: Vec<u32>,
    pub answers: Vec<usize>,
}

pub struct Corpus {
    pub train: Vec<Doc>,
    pub held_out: Vec<Doc>,
    /// Whether documents carry answer positions (the built-in task).
    pub has_answers: bool,
}

/// One document of the key–value recall task, from `rng`.
pub fn recall_doc(rng: &mut Rng) -> (String, Vec<usize>) {
    let pairs = 3 + rng.below(4);
    let mut keys: Vec<u8> = (b'a'..=b'z').collect();
    rng.shuffle(&mut keys);
    let keys = &keys[..pairs];
    let values: Vec<u8> = (0..pairs).map(|_| b'0' + rng.below(10) as u8).collect();
    let mut s = String::new();
    for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push(k as char);
        s.push(v as char);
    }
    s.push('|');
    // Every key is asked for once, in another order: half the digits are answers.
    let mut order: Vec<usize> = (0..pairs).collect();
    rng.shuffle(&mut order);
    let mut answers = Vec::new();
    for (q, &i) in order.iter().enumerate() {
        if q > 0 {
            s.push(' ');
        }
        s.push(keys[i] as char);
        answers.push(s.len());
        s.push(values[i] as char);
    }
    (s, answers)
}

/// The built-in task: `train` documents to learn from and `held_out` others, from `seed`.
pub fn recall(seed: u64, train: usize, held_out: usize) -> Corpus {
    let make = |seed: u64, n: usize| -> Vec<Doc> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let (s, answers) = recall_doc(&mut rng);
                Doc {
                    tokens: s.bytes().map(u32::from).collect(),
                    answers,
                }
            })
            .collect()
    };
    Corpus {
        train: make(seed, train),
        // A different stream, so held-out documents are not training documents.
        held_out: make(seed ^ 0xA5A5_5A5A_0F0F_F0F0, held_out),
        has_answers: true,
    }
}

/// A text file: paragraphs (blank-line separated) are documents, each tokenized and cut
/// into pieces of at most `max_len` tokens; every tenth document (at least one) is held out.
pub fn text(path: &Path, vocab: &Vocab, max_len: usize) -> Result<Corpus> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let mut docs = Vec::new();
    for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let tokens = vocab.encode(para)?;
        for piece in tokens.chunks(max_len.max(1)) {
            docs.push(Doc {
                tokens: piece.to_vec(),
                answers: Vec::new(),
            });
        }
    }
    if docs.len() < 2 {
        bail!(
            "{}: found {} document(s); need at least 2 (paragraphs separated by blank lines) to hold one out",
            path.display(),
            docs.len()
        );
    }
    let mut train = Vec::new();
    let mut held_out = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        if i % 10 == 9 {
            held_out.push(d);
        } else {
            train.push(d);
        }
    }
    if held_out.is_empty() {
        held_out.push(train.pop().expect("at least two documents"));
    }
    Ok(Corpus {
        train,
        held_out,
        has_answers: false,
    })
}
