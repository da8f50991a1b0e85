//! Training data: the built-in majority task (generated, no download) or any UTF-8 text
//! file, split into documents, with a held-out part.
//!
//! The built-in task: a document is a string of letters from `a`–`d`, then `|`, then the
//! letter that occurs most often in it, e.g. `abddbdcdbadd|d`. The answer depends on every
//! letter of its own document, however far back — and only on those: packed next to other
//! documents, a model gets it right only if the documents mask keeps the others out of its
//! attention. The score is the fraction of answers predicted exactly (chance: 1 in 4).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::rng::Rng;
use crate::vocab::Vocab;

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

/// One document of the majority task: (text, position of the answer).
pub fn majority_doc(rng: &mut Rng) -> (String, Vec<usize>) {
    loop {
        let n = 9 + rng.below(22);
        // One letter is drawn more often, so that a strict majority is common.
        let favourite = rng.below(4);
        let letters: Vec<usize> = (0..n)
            .map(|_| {
                if rng.unit() < 0.3 {
                    favourite
                } else {
                    rng.below(4)
                }
            })
            .collect();
        let mut counts = [0usize; 4];
        letters.iter().for_each(|&l| counts[l] += 1);
        let top = *counts.iter().max().expect("four letters");
        if counts.iter().filter(|&&c| c == top).count() > 1 {
            continue; // a tie has no answer
        }
        let answer = counts
            .iter()
            .position(|&c| c == top)
            .expect("a maximum exists");
        let mut s: String = letters.iter().map(|&l| (b'a' + l as u8) as char).collect();
        s.push('|');
        let at = s.len();
        s.push((b'a' + answer as u8) as char);
        return (s, vec![at]);
    }
}

/// The built-in task: `train` documents to learn from and `held_out` others, from `seed`.
pub fn majority(seed: u64, train: usize, held_out: usize) -> Corpus {
    let make = |seed: u64, n: usize| -> Vec<Doc> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let (s, answers) = majority_doc(&mut rng);
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
