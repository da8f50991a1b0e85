//! `items`: next-item recommendation, SASRec-style (Kang & McAuley, 2018) — causal
//! attention over a user's history of item ids; every position predicts the next item
//! (a softmax over all items, the head tied to the item embedding).
//!
//! The histories are generated from latent tastes (no download): items belong to genres
//! and have a popularity within them, and genres come in series (item `j` is often
//! followed by `j + 1` of the same genre, as episodes are); a user likes two or three
//! genres, stays in a genre for a while, then moves to another of theirs. So the next item
//! depends on the user's tastes (the whole history) and on the last items — what
//! attention over the history can learn and a popularity ranking cannot.
//!
//! Held out: users never trained on, scored on their last item (leave-one-out) by the full
//! ranking over all items: hit@10 (the item among the ten best) and NDCG@10, beside the
//! same figures for the ten most popular items of the training histories.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use maskattn::Mask;
use serde::{Deserialize, Serialize};

use super::api::{Input, Task, TaskEval};
use super::encoder::Trunk;
use super::figure::{Figure, Line, Panel, Role};
use crate::rng::Rng;

/// The sizes of the generated data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemsSettings {
    /// Items in the catalogue.
    pub items: usize,
    /// Genres the items fall into.
    pub genres: usize,
    /// Items a model sees per user (the row length); a user has one more, the target.
    pub history: usize,
    /// Held-out users.
    pub held_out: usize,
}

impl Default for ItemsSettings {
    fn default() -> Self {
        ItemsSettings {
            items: 400,
            genres: 16,
            history: 32,
            held_out: 512,
        }
    }
}

/// Users' histories, one row each: `history + 1` items (the last is only a target).
pub struct Users {
    pub rows: usize,
    /// `[rows, history + 1]`.
    pub items: Vec<u32>,
}

/// The item embedding (also the head, tied), an output bias per item, positions.
pub struct ItemLayers {
    item: Embedding,
    out_bias: Tensor,
    pos: Embedding,
}

/// The generated world: genres, popularity and series order of the items.
pub struct Items {
    settings: ItemsSettings,
    /// Items of each genre, in series order.
    genre_items: Vec<Vec<u32>>,
    /// Per genre, the cumulative popularity weights of its items.
    genre_cdf: Vec<Vec<f64>>,
    /// Where each item sits: (genre, index in it).
    place: Vec<(usize, usize)>,
    held_out: Users,
    /// Every item, the most frequent in the training histories first.
    popular: Vec<u32>,
    /// hit@10 and NDCG@10 of `popular` on the held-out users.
    baseline: (f64, f64),
}

/// Draw purposes of the data (distinct from the trainer's).
const WORLD: u64 = 101;
const TRAIN: u64 = 102;
const HELD_OUT: u64 = 103;
const K: usize = 10;
/// The largest k of the hit@k picture.
const K_MAX: usize = 50;

fn pick(cdf: &[f64], rng: &mut Rng) -> usize {
    let u = rng.unit() * cdf[cdf.len() - 1];
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

impl Items {
    /// `rows` users drawn from `rng`.
    fn users(&self, rows: usize, rng: &mut Rng) -> Users {
        let s = &self.settings;
        let n = s.history + 1;
        let mut items = Vec::with_capacity(rows * n);
        for _ in 0..rows {
            // Two or three favourite genres, with uneven weights.
            let k = 2 + rng.below(2);
            let mut tastes: Vec<usize> = Vec::new();
            while tastes.len() < k {
                let g = rng.below(s.genres);
                if !tastes.contains(&g) {
                    tastes.push(g);
                }
            }
            let w: Vec<f64> = (0..k).map(|i| 1.0 / (i + 1) as f64).collect();
            let cdf: Vec<f64> = w
                .iter()
                .scan(0.0, |a, x| {
                    *a += x;
                    Some(*a)
                })
                .collect();
            let mut genre = tastes[pick(&cdf, rng)];
            let mut last: Option<u32> = None;
            for _ in 0..n {
                let r = rng.unit();
                if r < 0.25 {
                    genre = tastes[pick(&cdf, rng)];
                } else if r < 0.28 {
                    genre = rng.below(s.genres);
                }
                let item = match last {
                    // The next episode of the series just watched.
                    Some(l) if self.place[l as usize].0 == genre && rng.unit() < 0.5 => {
                        let (g, i) = self.place[l as usize];
                        self.genre_items[g][(i + 1) % self.genre_items[g].len()]
                    }
                    _ => self.genre_items[genre][pick(&self.genre_cdf[genre], rng)],
                };
                items.push(item);
                last = Some(item);
            }
        }
        Users { rows, items }
    }

    /// The rank of each held-out user's last item in the model's full ranking (0: first;
    /// ties count in its favour), and the summed negative log-likelihood of those items.
    fn held_out_ranks(
        &self,
        layers: &ItemLayers,
        forward: &mut dyn FnMut(&Users) -> Result<Tensor>,
    ) -> Result<(Vec<usize>, f64)> {
        let (l, n) = (self.settings.history, self.settings.history + 1);
        let (mut ranks, mut loss) = (Vec::new(), 0.0);
        let h = &self.held_out;
        for start in (0..h.rows).step_by(64) {
            let rows = (h.rows - start).min(64);
            let b = Users {
                rows,
                items: h.items[start * n..(start + rows) * n].to_vec(),
            };
            let hidden = forward(&b)?;
            // The last position predicts the user's last item.
            let last = hidden.narrow(1, l - 1, 1)?;
            let logits = self.logits(layers, &last)?.squeeze(1)?;
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let scores: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let lps: Vec<Vec<f32>> = lp.to_vec2()?;
            for (r, row) in scores.iter().enumerate() {
                let target = b.items[r * n + n - 1] as usize;
                let t = row[target];
                ranks.push(row.iter().filter(|&&s| s > t).count());
                loss -= lps[r][target] as f64;
            }
        }
        Ok((ranks, loss))
    }

    /// hit@10 and NDCG@10 of one ranking of the target.
    fn score(rank: usize) -> (f64, f64) {
        if rank < K {
            (1.0, 1.0 / ((rank + 2) as f64).log2())
        } else {
            (0.0, 0.0)
        }
    }
}

impl Task for Items {
    const NAME: &'static str = "items";
    type Settings = ItemsSettings;
    type Layers = ItemLayers;
    type Batch = Users;

    fn new(settings: ItemsSettings, seed: u64) -> Result<Self> {
        let s = &settings;
        if s.genres < 3 || s.items < 2 * s.genres {
            bail!(
                "items: need at least 3 genres and 2 items a genre, got {} items, {} genres",
                s.items,
                s.genres
            );
        }
        if s.history < 7 || s.held_out == 0 {
            bail!("items: the history must be at least 7 items and some users held out");
        }
        let mut rng = Rng::at(seed, WORLD, 0);
        // Items shuffled into genres; popularity falls as a power of the rank in a genre,
        // and genres differ in popularity too.
        let mut order: Vec<u32> = (0..s.items as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut genre_items = vec![Vec::new(); s.genres];
        for (i, &it) in order.iter().enumerate() {
            genre_items[i % s.genres].push(it);
        }
        let mut place = vec![(0, 0); s.items];
        let mut genre_cdf = Vec::new();
        for (g, its) in genre_items.iter().enumerate() {
            let mut acc = 0.0;
            let mut cdf = Vec::new();
            for (i, &it) in its.iter().enumerate() {
                place[it as usize] = (g, i);
                // Popularity by a random rank, so that series order and popularity differ.
                acc += 1.0 / (1.0 + rng.below(its.len()) as f64).powf(0.9);
                cdf.push(acc);
            }
            genre_cdf.push(cdf);
        }
        let mut me = Items {
            held_out: Users {
                rows: 0,
                items: Vec::new(),
            },
            settings,
            genre_items,
            genre_cdf,
            place,
            popular: Vec::new(),
            baseline: (0.0, 0.0),
        };
        me.held_out = me.users(me.settings.held_out, &mut Rng::at(seed, HELD_OUT, 0));
        // Popularity counted on the histories of the first 64 training batches' users.
        let mut counts = vec![0usize; me.settings.items];
        for step in 0..64 {
            for &it in &me.train_batch(seed, step, 32)?.items {
                counts[it as usize] += 1;
            }
        }
        let mut popular: Vec<u32> = (0..me.settings.items as u32).collect();
        popular.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
        let n = me.settings.history + 1;
        let (mut hit, mut ndcg) = (0.0, 0.0);
        for u in 0..me.held_out.rows {
            let target = me.held_out.items[u * n + n - 1];
            let rank = popular.iter().position(|&p| p == target).unwrap_or(K);
            let (h, d) = Items::score(rank);
            hit += h;
            ndcg += d;
        }
        let users = me.held_out.rows as f64;
        me.baseline = (hit / users, ndcg / users);
        me.popular = popular;
        Ok(me)
    }

    fn settings(&self) -> &ItemsSettings {
        &self.settings
    }

    fn row_len(&self) -> usize {
        self.settings.history
    }

    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<ItemLayers> {
        let d = trunk.d_model;
        Ok(ItemLayers {
            item: candle_nn::embedding(self.settings.items, d, vb.pp("item_emb"))?,
            out_bias: vb.get_with_hints(
                self.settings.items,
                "out_bias",
                candle_nn::Init::Const(0.0),
            )?,
            pos: candle_nn::embedding(self.settings.history, d, vb.pp("pos_emb"))?,
        })
    }

    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Users> {
        Ok(self.users(rows, &mut Rng::at(seed, TRAIN, step)))
    }

    fn input(&self, layers: &ItemLayers, b: &Users, _trunk: &Trunk) -> Result<Input> {
        let (l, n) = (self.settings.history, self.settings.history + 1);
        let ids: Vec<u32> = (0..b.rows)
            .flat_map(|r| b.items[r * n..r * n + l].iter().copied())
            .collect();
        let ids = Tensor::from_vec(ids, (b.rows, l), &Device::Cpu)?;
        let pos = Tensor::arange(0u32, l as u32, &Device::Cpu)?;
        let x = candle_core::Module::forward(&layers.item, &ids)?
            .broadcast_add(&candle_core::Module::forward(&layers.pos, &pos)?)?;
        Ok(Input {
            x,
            mask: Mask::causal(),
            layer_masks: None,
            bias: None,
        })
    }

    fn loss(&self, layers: &ItemLayers, hidden: &Tensor, b: &Users) -> Result<Tensor> {
        let (l, n) = (self.settings.history, self.settings.history + 1);
        let logits = self.logits(layers, hidden)?;
        let targets: Vec<u32> = (0..b.rows)
            .flat_map(|r| b.items[r * n + 1..r * n + n].iter().copied())
            .collect();
        let weights = vec![1f32; b.rows * l];
        let sum = maskattn_candle::fused::weighted_nll(&logits, &targets, &weights)?;
        Ok((sum * (1.0 / (b.rows * l) as f64))?)
    }

    fn evaluate(
        &self,
        layers: &ItemLayers,
        forward: &mut dyn FnMut(&Users) -> Result<Tensor>,
    ) -> Result<TaskEval> {
        let (ranks, loss) = self.held_out_ranks(layers, forward)?;
        let (mut hit, mut ndcg) = (0.0, 0.0);
        for &rank in &ranks {
            let (hh, dd) = Items::score(rank);
            hit += hh;
            ndcg += dd;
        }
        let users = ranks.len() as f64;
        Ok(TaskEval {
            loss: loss / users,
            metric: hit / users,
            metric_name: "hit@10".into(),
            details: format!(
                "NDCG@10 {:.3} (popularity: {:.3})",
                ndcg / users,
                self.baseline.1
            ),
        })
    }

    /// hit@k of the model and of the popularity ranking for k = 1 … 50.
    fn figures(
        &self,
        layers: &ItemLayers,
        forward: &mut dyn FnMut(&Users) -> Result<Tensor>,
    ) -> Result<Vec<Figure>> {
        let (model, _) = self.held_out_ranks(layers, forward)?;
        let n = self.settings.history + 1;
        let popular: Vec<usize> = (0..self.held_out.rows)
            .map(|u| {
                let target = self.held_out.items[u * n + n - 1];
                let rank = self.popular.iter().position(|&p| p == target);
                rank.expect("every item is ranked")
            })
            .collect();
        let curve = |ranks: &[usize]| -> Vec<(f64, f64)> {
            (1..=K_MAX.min(self.settings.items))
                .map(|k| {
                    let hits = ranks.iter().filter(|&&r| r < k).count();
                    (k as f64, hits as f64 / ranks.len() as f64)
                })
                .collect()
        };
        let line = |label: &str, role, ranks: &[usize]| Line {
            label: label.into(),
            role,
            points: curve(ranks),
        };
        Ok(vec![Figure {
            name: "hits".into(),
            title: format!(
                "held-out hit@k: the target among the k best of {} items",
                self.settings.items
            ),
            x_label: "k".into(),
            y_label: "hit@k".into(),
            panels: vec![Panel {
                title: format!("{} users", self.held_out.rows),
                lines: vec![
                    line("model", Role::Model, &model),
                    line("popularity", Role::Baseline, &popular),
                ],
                divider: Some(K as f64),
            }],
        }])
    }

    fn summary(&self, metric: f64) -> String {
        format!(
            "{:.1}% (popularity: {:.1}%)",
            100.0 * metric,
            100.0 * self.baseline.0
        )
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "next-item recommendation: {} items in {} genres, histories of {} items, {} held-out users",
            s.items, s.genres, s.history, s.held_out
        )
    }
}

impl Items {
    /// Scores of every item, `[.., items]`: the tied head plus a bias per item.
    fn logits(&self, layers: &ItemLayers, hidden: &Tensor) -> Result<Tensor> {
        Ok(maskattn_candle::fused::linear(
            hidden,
            layers.item.embeddings(),
            Some(&layers.out_bias),
        )?)
    }

    /// hit@10 and NDCG@10 of the popularity ranking on the held-out users.
    pub fn popularity(&self) -> (f64, f64) {
        self.baseline
    }
}
