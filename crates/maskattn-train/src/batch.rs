//! Batches: documents laid into rows either *packed* (several documents per row, a
//! documents mask keeps them apart, no padding) or *padded* (one document per row, a key
//! padding mask hides the padding); targets and loss weights for either objective.

use anyhow::{bail, Result};
use maskattn::{BlockMask, Mask, MaskShape};
use serde::{Deserialize, Serialize};

use crate::corpus::Doc;
use crate::rng::Rng;
use crate::vocab::Vocab;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// BERT-style: predict masked tokens, attention both ways.
    Mlm,
    /// GPT-style: predict the next token, causal attention.
    Clm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Several documents per row with a documents mask.
    Packed,
    /// One document per row, padded, with a key padding mask.
    Padded,
}

/// `rows × len` tokens with what the loss needs.
#[derive(Clone, Debug)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    /// Model inputs (MLM: corrupted).
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// 1 where the loss counts.
    pub weights: Vec<f32>,
    /// Document id per position (packed); padding has id −1.
    pub doc_ids: Vec<i64>,
    /// Real tokens per row (padded layout; the row length for packed).
    pub lengths: Vec<usize>,
    /// Flat positions whose prediction is an answer of the built-in task, with the answer.
    pub answers: Vec<(usize, u32)>,
    layout: Layout,
}

/// How MLM corrupts: which positions count, and what they show the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MlmChoice {
    /// The BERT rule: 15% of the positions; of those 80% [MASK], 10% a random token, 10% kept.
    Random,
    /// Evaluation of the built-in task: exactly the answer positions, all shown as [MASK].
    Answers,
}

impl Batch {
    /// The attention mask of this batch for `objective`.
    pub fn mask(&self, objective: Objective) -> Mask {
        let data = match self.layout {
            Layout::Packed => Mask::documents(self.doc_ids.clone(), self.rows),
            Layout::Padded => Mask::key_padding(self.lengths.clone()),
        };
        match objective {
            Objective::Clm => Mask::causal() & data,
            Objective::Mlm => data,
        }
    }

    /// What the mask saves: (fraction of token slots that hold real tokens, fraction of
    /// attention pairs hidden, fraction of 64×64 tiles the kernels skip).
    pub fn savings(&self, objective: Objective, heads: usize) -> Result<(f64, f64, f64)> {
        let real =
            self.doc_ids.iter().filter(|&&d| d >= 0).count() as f64 / self.doc_ids.len() as f64;
        let shape = MaskShape::new(self.rows, heads, self.len, self.len);
        let st = BlockMask::new(&self.mask(objective), shape)?.stats();
        Ok((real, st.hidden_pair_fraction(), st.skipped_tile_fraction()))
    }
}

/// Documents laid into rows.
pub struct Laid {
    pub tokens: Vec<u32>,
    /// Document id per position; −1 for padding.
    pub doc_ids: Vec<i64>,
    /// Positions used per row.
    pub lengths: Vec<usize>,
    /// Flat positions of answer tokens, with the token.
    pub answers: Vec<(usize, u32)>,
}

/// Lays `docs` (each followed by the separator) into `rows × len`.
pub fn lay_out(
    docs: &[&Doc],
    rows: usize,
    len: usize,
    layout: Layout,
    vocab: &Vocab,
) -> Result<Laid> {
    let mut tokens = vec![vocab.pad(); rows * len];
    let mut ids = vec![-1i64; rows * len];
    let mut lengths = vec![0usize; rows];
    let mut answers = Vec::new();
    let mut next_row = 0usize;
    for (id, d) in docs.iter().enumerate() {
        let n = (d.tokens.len() + 1).min(len);
        // Packed: the first row with room (first fit); padded: a row of its own.
        let row = match layout {
            Layout::Packed => (0..rows).find(|&r| lengths[r] + n <= len),
            Layout::Padded => Some(next_row).filter(|&r| r < rows),
        };
        let Some(row) = row else {
            if layout == Layout::Padded || lengths.iter().all(|&l| l + 2 > len) {
                break;
            }
            continue;
        };
        next_row += 1;
        let base = row * len + lengths[row];
        for (i, &t) in d
            .tokens
            .iter()
            .chain(std::iter::once(&vocab.sep()))
            .take(n)
            .enumerate()
        {
            tokens[base + i] = t;
            ids[base + i] = id as i64;
        }
        answers.extend(
            d.answers
                .iter()
                .filter(|&&a| a < n)
                .map(|&a| (base + a, d.tokens[a])),
        );
        lengths[row] += n;
    }
    if lengths.iter().all(|&l| l == 0) {
        bail!("no document fits a row of {len} tokens");
    }
    Ok(Laid {
        tokens,
        doc_ids: ids,
        lengths,
        answers,
    })
}

/// Chooses MLM positions and corrupts them: returns (inputs, weights).
pub fn mlm_corrupt(
    tokens: &[u32],
    eligible: impl Fn(usize) -> bool,
    choice: MlmChoice,
    answers: &[(usize, u32)],
    vocab: &Vocab,
    rng: &mut Rng,
) -> (Vec<u32>, Vec<f32>) {
    let mut inputs = tokens.to_vec();
    let mut weights = vec![0f32; tokens.len()];
    match choice {
        MlmChoice::Answers => {
            for &(p, _) in answers {
                inputs[p] = vocab.mask();
                weights[p] = 1.0;
            }
        }
        MlmChoice::Random => {
            for p in 0..tokens.len() {
                if !eligible(p) || rng.unit() >= 0.15 {
                    continue;
                }
                weights[p] = 1.0;
                let r = rng.unit();
                if r < 0.8 {
                    inputs[p] = vocab.mask();
                } else if r < 0.9 {
                    inputs[p] = random_token(vocab, rng);
                }
            }
        }
    }
    (inputs, weights)
}

fn random_token(vocab: &Vocab, rng: &mut Rng) -> u32 {
    loop {
        let t = rng.below(vocab.size()) as u32;
        if !vocab.is_special(t) {
            return t;
        }
    }
}

/// A batch of `docs` for `objective`. `rng` drives MLM's choices.
#[allow(clippy::too_many_arguments)]
pub fn make(
    docs: &[&Doc],
    rows: usize,
    len: usize,
    layout: Layout,
    objective: Objective,
    choice: MlmChoice,
    vocab: &Vocab,
    rng: &mut Rng,
) -> Result<Batch> {
    let Laid {
        tokens,
        doc_ids,
        lengths,
        answers,
    } = lay_out(docs, rows, len, layout, vocab)?;
    let (inputs, targets, weights, answers) = match objective {
        Objective::Clm => {
            // Position p predicts token p + 1 of the same document.
            let mut targets = vec![vocab.pad(); tokens.len()];
            let mut weights = vec![0f32; tokens.len()];
            for p in 0..tokens.len() {
                let same_doc = (p + 1) % len != 0
                    && p + 1 < tokens.len()
                    && doc_ids[p] >= 0
                    && doc_ids[p + 1] == doc_ids[p];
                if same_doc {
                    targets[p] = tokens[p + 1];
                    weights[p] = 1.0;
                }
            }
            let answers = answers.iter().map(|&(p, t)| (p - 1, t)).collect();
            (tokens, targets, weights, answers)
        }
        Objective::Mlm => {
            let eligible = |p: usize| doc_ids[p] >= 0 && !vocab.is_special(tokens[p]);
            let (inputs, weights) = mlm_corrupt(&tokens, eligible, choice, &answers, vocab, rng);
            (inputs, tokens, weights, answers)
        }
    };
    Ok(Batch {
        rows,
        len,
        inputs,
        targets,
        weights,
        doc_ids,
        lengths,
        answers,
        layout,
    })
}

/// Training batch of step `step`: documents drawn from `docs` by a generator of
/// `(seed, step)` alone, so a resumed run sees the same batches.
#[allow(clippy::too_many_arguments)]
pub fn for_step(
    docs: &[Doc],
    seed: u64,
    step: u64,
    rows: usize,
    len: usize,
    layout: Layout,
    objective: Objective,
    vocab: &Vocab,
) -> Result<Batch> {
    let mut rng = Rng::at(seed, 1, step);
    // Enough documents to fill every row when packed (each is at least 2 tokens with its separator).
    let want = match layout {
        Layout::Padded => rows,
        Layout::Packed => rows * len / 2 + 1,
    };
    let picked: Vec<&Doc> = (0..want).map(|_| &docs[rng.below(docs.len())]).collect();
    make(
        &picked,
        rows,
        len,
        layout,
        objective,
        MlmChoice::Random,
        vocab,
        &mut rng,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(n: usize, base: u32) -> Doc {
        Doc {
            tokens: (0..n as u32).map(|i| base + i % 50).collect(),
            answers: Vec::new(),
        }
    }

    #[test]
    fn mlm_follows_the_80_10_10_rule() {
        let vocab = Vocab::Bytes;
        let tokens: Vec<u32> = (0..200_000u32).map(|i| 97 + i % 26).collect();
        let mut rng = Rng::new(9);
        let (inputs, weights) =
            mlm_corrupt(&tokens, |_| true, MlmChoice::Random, &[], &vocab, &mut rng);
        let chosen: Vec<usize> = (0..tokens.len()).filter(|&p| weights[p] > 0.0).collect();
        let frac = chosen.len() as f64 / tokens.len() as f64;
        assert!((frac - 0.15).abs() < 0.005, "chose {frac}");
        let masked = chosen
            .iter()
            .filter(|&&p| inputs[p] == vocab.mask())
            .count() as f64
            / chosen.len() as f64;
        let kept =
            chosen.iter().filter(|&&p| inputs[p] == tokens[p]).count() as f64 / chosen.len() as f64;
        let random = chosen
            .iter()
            .filter(|&&p| inputs[p] != tokens[p] && inputs[p] != vocab.mask())
            .count() as f64
            / chosen.len() as f64;
        // A random replacement equals the original 1 time in 256: "kept" is 10% plus a hair.
        assert!((masked - 0.8).abs() < 0.01, "[MASK] {masked}");
        assert!((kept - 0.1).abs() < 0.01, "kept {kept}");
        assert!((random - 0.1).abs() < 0.01, "random {random}");
        // Positions not chosen are untouched, and no special token is ever the random one.
        assert!((0..tokens.len())
            .filter(|&p| weights[p] == 0.0)
            .all(|p| inputs[p] == tokens[p]));
        assert!(inputs
            .iter()
            .all(|&t| t == vocab.mask() || !vocab.is_special(t)));
        // Ineligible positions are never chosen.
        let (_, w) = mlm_corrupt(
            &tokens,
            |p| p % 2 == 0,
            MlmChoice::Random,
            &[],
            &vocab,
            &mut rng,
        );
        assert!((0..tokens.len())
            .filter(|p| p % 2 == 1)
            .all(|p| w[p] == 0.0));
    }

    #[test]
    fn packing_keeps_documents_whole_and_apart() {
        let vocab = Vocab::Bytes;
        let docs = [doc(5, 100), doc(9, 200), doc(3, 300), doc(20, 400)];
        let refs: Vec<&Doc> = docs.iter().collect();
        let Laid {
            tokens,
            doc_ids: ids,
            lengths,
            ..
        } = lay_out(&refs, 2, 16, Layout::Packed, &vocab).unwrap();
        // Row 0: doc 0 (5 + sep) and doc 1 (9 + sep) = 16; row 1: doc 2 (3 + sep), then doc 3 (20 + sep) does not fit.
        assert_eq!(&ids[..16], &[[0i64; 6].as_slice(), &[1; 10]].concat()[..]);
        assert_eq!(&ids[16..20], &[2; 4]);
        assert!(ids[20..].iter().all(|&d| d == -1));
        assert_eq!(lengths, vec![16, 4]);
        assert_eq!(tokens[5], vocab.sep());
        assert_eq!(tokens[20], vocab.pad());
        let Laid {
            doc_ids: ids,
            lengths,
            ..
        } = lay_out(&refs, 4, 16, Layout::Padded, &vocab).unwrap();
        assert_eq!(lengths, vec![6, 10, 4, 16]);
        assert!(ids[16..26].iter().all(|&d| d == 1) && ids[26..32].iter().all(|&d| d == -1));
    }

    #[test]
    fn clm_targets_never_cross_a_document() {
        let vocab = Vocab::Bytes;
        let docs = [doc(5, 100), doc(4, 200)];
        let refs: Vec<&Doc> = docs.iter().collect();
        let b = make(
            &refs,
            1,
            16,
            Layout::Packed,
            Objective::Clm,
            MlmChoice::Random,
            &vocab,
            &mut Rng::new(1),
        )
        .unwrap();
        for p in 0..15 {
            if b.weights[p] > 0.0 {
                assert_eq!(b.doc_ids[p], b.doc_ids[p + 1]);
                assert_eq!(b.targets[p], b.inputs[p + 1]);
            }
        }
        // 5 + 4 real predictions (each token predicts the next, the last one the separator).
        assert_eq!(b.weights.iter().sum::<f32>(), 9.0);
    }
}
