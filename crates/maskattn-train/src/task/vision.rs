//! `vision`: image classification by a small ViT-style encoder. An image is cut into
//! `patch × patch` patches, each one token in raster order on the patch grid: a linear
//! embedding of the patch and `overlap` pixels around it (overlapping windows, as the
//! convolutional tokenizers of NAT and CvT see), plus a learned position; the outputs are
//! max-pooled over the patches (no class token, which would leave the grid) into a linear
//! classifier.
//!
//! The mask is the image's: full attention, NATTEN's neighbourhood attention (a clamped
//! `k × k` window, optionally dilated; Hassani et al. 2023) or Swin's windows (Liu et al.
//! 2021), plain on even layers and shifted by `w/2` on odd ones, each with its region ids —
//! the kernel's [`Mask::natten_dilated`] and [`Mask::swin`], exactly as defined there.
//!
//! The images are generated (no download): eight classes — disk, square, triangle, cross,
//! ring, horizontal stripes, vertical stripes, checkerboard — at a random position and
//! size, on a background of random level with a contrast of random size and sign, under
//! Gaussian noise; each image is standardised (zero mean, unit spread) before it is cut
//! into patches. Held out: fixed images never trained on; accuracy and cross-entropy.

use anyhow::{bail, Result};
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use maskattn::{BlockMask, Mask, MaskShape};
use serde::{Deserialize, Serialize};

use super::api::{Input, Task, TaskEval};
use super::encoder::Trunk;
use crate::rng::Rng;

/// The attention mask over the patch grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VisionMask {
    Full,
    /// NATTEN: a `kernel × kernel` window (odd), `dilation` apart.
    Natten {
        kernel: usize,
        dilation: usize,
    },
    /// Swin: `window × window` windows, shifted by `window / 2` on odd layers.
    Swin {
        window: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionSettings {
    /// Image side in pixels.
    pub image: usize,
    /// Patch side in pixels (`image / patch` patches a side).
    pub patch: usize,
    /// Pixels around each patch that its token's embedding also sees (zeros beyond the
    /// image): windows of `patch + 2 · overlap` pixels at a stride of `patch`.
    #[serde(default)]
    pub overlap: usize,
    /// Spread of the Gaussian pixel noise.
    pub noise: f64,
    /// Held-out images.
    pub held_out: usize,
    pub mask: VisionMask,
}

impl Default for VisionSettings {
    fn default() -> Self {
        VisionSettings {
            image: 96,
            patch: 4,
            overlap: 2,
            noise: 0.3,
            held_out: 512,
            mask: VisionMask::Natten {
                kernel: 5,
                dilation: 1,
            },
        }
    }
}

/// The class names, in label order.
pub const CLASSES: [&str; 8] = [
    "disk",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal stripes",
    "vertical stripes",
    "checkerboard",
];

/// Images with their labels.
pub struct Images {
    pub rows: usize,
    /// `[rows, image, image]` pixel values.
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    /// The patch (raster index on the grid) at each image's object centre.
    pub centre: Vec<usize>,
}

pub struct VisionLayers {
    patch_in: Linear,
    pos: Embedding,
    head: Linear,
}

pub struct Vision {
    settings: VisionSettings,
    held_out: Images,
}

const TRAIN: u64 = 301;
const HELD_OUT: u64 = 302;
/// Held-out images per forward pass.
const EVAL_ROWS: usize = 32;

impl Vision {
    /// Patches a side.
    pub fn grid(&self) -> usize {
        self.settings.image / self.settings.patch
    }

    /// The held-out images.
    pub fn held_out(&self) -> &Images {
        &self.held_out
    }

    /// Held-out image `i` alone, as a batch.
    pub fn held_out_image(&self, i: usize) -> Images {
        let n = self.settings.image * self.settings.image;
        let h = &self.held_out;
        Images {
            rows: 1,
            pixels: h.pixels[i * n..(i + 1) * n].to_vec(),
            labels: vec![h.labels[i]],
            centre: vec![h.centre[i]],
        }
    }

    /// The mask of each layer's turn: one mask, or for Swin the plain and the shifted
    /// windows (layer `i` takes `masks()[i % len]`).
    pub fn masks(&self) -> Vec<Mask> {
        let g = self.grid();
        match self.settings.mask {
            VisionMask::Full => vec![Mask::full()],
            VisionMask::Natten { kernel, dilation } => {
                vec![Mask::natten_dilated(g, g, kernel, dilation)]
            }
            VisionMask::Swin { window } => vec![
                Mask::swin(g, g, window, 0),
                Mask::swin(g, g, window, window / 2),
            ],
        }
    }

    /// The fraction of the kernels' tiles the masks leave empty (skipped), averaged over
    /// the masks' turns (for Swin: the plain and the shifted windows, as an even number of
    /// layers sees them), from the compiled block masks.
    pub fn tiles_skipped(&self) -> Result<f64> {
        let l = self.grid() * self.grid();
        let masks = self.masks();
        let mut sum = 0.0;
        for m in &masks {
            sum += BlockMask::new(m, MaskShape::new(1, 1, l, l))?
                .stats()
                .skipped_tile_fraction();
        }
        Ok(sum / masks.len() as f64)
    }

    /// The mask in words, e.g. `natten 5×5 on the 24×24 patch grid`.
    pub fn mask_words(&self) -> String {
        let g = self.grid();
        match self.settings.mask {
            VisionMask::Full => format!("full attention over the {g}×{g} patch grid"),
            VisionMask::Natten { kernel, dilation } => format!(
                "NATTEN {kernel}×{kernel}{} on the {g}×{g} patch grid",
                if dilation > 1 {
                    format!(", dilation {dilation}")
                } else {
                    String::new()
                }
            ),
            VisionMask::Swin { window } => format!(
                "Swin {window}×{window} windows, shifted by {} on odd layers, on the {g}×{g} patch grid",
                window / 2
            ),
        }
    }

    /// `rows` images drawn from `rng`.
    fn images(&self, rows: usize, rng: &mut Rng) -> Images {
        let n = self.settings.image;
        let mut b = Images {
            rows,
            pixels: Vec::with_capacity(rows * n * n),
            labels: Vec::with_capacity(rows),
            centre: Vec::with_capacity(rows),
        };
        for _ in 0..rows {
            let label = rng.below(CLASSES.len());
            let (pixels, (cy, cx)) = self.draw(label, rng);
            b.pixels.extend(pixels);
            b.labels.push(label as u32);
            let (p, g) = (self.settings.patch, self.grid());
            b.centre.push((cy / p).min(g - 1) * g + (cx / p).min(g - 1));
        }
        b
    }

    /// One image of class `label` and its object's centre pixel `(y, x)`.
    fn draw(&self, label: usize, rng: &mut Rng) -> (Vec<f32>, (usize, usize)) {
        let n = self.settings.image as f64;
        // Half the object's side: from a sixth to a third of the image.
        let r = n / 6.0 + rng.unit() * n / 6.0;
        let cy = r + rng.unit() * (n - 2.0 * r);
        let cx = r + rng.unit() * (n - 2.0 * r);
        let background = rng.unit() - 0.5;
        let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
        let contrast = sign * (0.7 + 0.8 * rng.unit());
        // Stripe and square width of the textures, in pixels.
        let width = 2.0 + rng.below(2) as f64;
        let inside = |y: f64, x: f64| -> bool {
            let (dy, dx) = (y - cy, x - cx);
            let d2 = dy * dy + dx * dx;
            let in_square = dy.abs() <= 0.85 * r && dx.abs() <= 0.85 * r;
            // Bands counted from the square's edge (`c − r` on an axis centred at `c`).
            let band = |v: f64, c: f64| ((v - c + r) / width).floor().rem_euclid(2.0) == 0.0;
            match label {
                0 => d2 <= r * r,
                1 => in_square,
                // Apex up, base `2r` wide at `cy + r`.
                2 => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
                3 => {
                    (dx.abs() <= r / 3.0 && dy.abs() <= r) || (dy.abs() <= r / 3.0 && dx.abs() <= r)
                }
                4 => d2 <= r * r && d2 >= (0.55 * r).powi(2),
                5 => in_square && band(y, cy),
                6 => in_square && band(x, cx),
                _ => in_square && (band(y, cy) != band(x, cx)),
            }
        };
        let side = self.settings.image;
        let mut px = Vec::with_capacity(side * side);
        for y in 0..side {
            for x in 0..side {
                let on = inside(y as f64 + 0.5, x as f64 + 0.5);
                let v = background
                    + if on { contrast } else { 0.0 }
                    + self.settings.noise * rng.normal();
                px.push(v as f32);
            }
        }
        (px, (cy as usize, cx as usize))
    }

    /// Side of a token's window: the patch and `overlap` pixels on each side.
    fn window(&self) -> usize {
        self.settings.patch + 2 * self.settings.overlap
    }

    /// `[rows, L, window²]`: each token's window of pixels in raster order (zeros beyond the
    /// image), tokens in raster order, each image standardised first (zero mean, unit
    /// spread: the background level and the contrast vary between images, the shapes do
    /// not).
    fn patches(&self, b: &Images) -> Result<Tensor> {
        let (n, p, g) = (self.settings.image, self.settings.patch, self.grid());
        let (m, w) = (self.settings.overlap as isize, self.window());
        let mut out = Vec::with_capacity(b.rows * g * g * w * w);
        for r in 0..b.rows {
            let img = standardised(&b.pixels[r * n * n..(r + 1) * n * n]);
            let pixel = |y: isize, x: isize| -> f32 {
                let inside = (0..n as isize).contains(&y) && (0..n as isize).contains(&x);
                if inside {
                    img[y as usize * n + x as usize]
                } else {
                    0.0
                }
            };
            for gy in 0..g {
                for gx in 0..g {
                    let (top, left) = ((gy * p) as isize - m, (gx * p) as isize - m);
                    for y in 0..w as isize {
                        for x in 0..w as isize {
                            out.push(pixel(top + y, left + x));
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (b.rows, g * g, w * w), &Device::Cpu)?)
    }

    /// Class scores `[B, classes]` from the encoder's output, its maximum over the patches
    /// per channel. A mean lets the few patches on an outline (all that tells a disk from
    /// a square) drown in the background's (docs/domains.md has the runs).
    fn logits(&self, layers: &VisionLayers, hidden: &Tensor) -> Result<Tensor> {
        Ok(layers.head.forward(&hidden.max(1)?)?)
    }
}

/// `img` with zero mean and unit spread (a flat image: only the mean removed).
fn standardised(img: &[f32]) -> Vec<f32> {
    let n = img.len() as f64;
    let mean = img.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = img.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let scale = if var > 1e-12 { 1.0 / var.sqrt() } else { 1.0 };
    img.iter()
        .map(|&v| ((v as f64 - mean) * scale) as f32)
        .collect()
}

impl Task for Vision {
    const NAME: &'static str = "vision";
    type Settings = VisionSettings;
    type Layers = VisionLayers;
    type Batch = Images;

    fn new(settings: VisionSettings, seed: u64) -> Result<Self> {
        let s = &settings;
        if s.patch == 0 || s.image < 8 || !s.image.is_multiple_of(s.patch) {
            bail!(
                "vision: the patch ({} pixels) must divide the image ({} pixels, at least 8)",
                s.patch,
                s.image
            );
        }
        if s.overlap > s.image / 2 {
            bail!(
                "vision: the overlap ({} pixels) must be at most half the image ({} pixels)",
                s.overlap,
                s.image
            );
        }
        if !(s.noise.is_finite() && s.noise >= 0.0) || s.held_out == 0 {
            bail!("vision: the noise must be finite and ≥ 0, and some images held out");
        }
        let g = s.image / s.patch;
        match s.mask {
            VisionMask::Full => {}
            VisionMask::Natten { kernel, dilation } => {
                if kernel.is_multiple_of(2) {
                    bail!("--window {kernel}: NATTEN's window must be odd (it has a centre)");
                }
                if dilation == 0 {
                    bail!("--dilation 0: must be at least 1");
                }
                if kernel * dilation > g {
                    bail!(
                        "--window {kernel} × --dilation {dilation}: must be at most the patch grid's side, {g}"
                    );
                }
            }
            VisionMask::Swin { window } => {
                if window < 2 || !g.is_multiple_of(window) {
                    bail!(
                        "--window {window}: Swin's window must be at least 2 and divide the {g}×{g} patch grid"
                    );
                }
            }
        }
        let mut me = Vision {
            settings,
            held_out: Images {
                rows: 0,
                pixels: Vec::new(),
                labels: Vec::new(),
                centre: Vec::new(),
            },
        };
        me.held_out = me.images(me.settings.held_out, &mut Rng::at(seed, HELD_OUT, 0));
        Ok(me)
    }

    fn settings(&self) -> &VisionSettings {
        &self.settings
    }

    fn row_len(&self) -> usize {
        self.grid() * self.grid()
    }

    fn layers(&self, vb: VarBuilder, trunk: &Trunk) -> candle_core::Result<VisionLayers> {
        let d = trunk.d_model;
        Ok(VisionLayers {
            patch_in: candle_nn::linear(self.window() * self.window(), d, vb.pp("patch_in"))?,
            pos: candle_nn::embedding(self.row_len(), d, vb.pp("pos_emb"))?,
            head: candle_nn::linear(d, CLASSES.len(), vb.pp("head"))?,
        })
    }

    fn train_batch(&self, seed: u64, step: u64, rows: usize) -> Result<Images> {
        Ok(self.images(rows, &mut Rng::at(seed, TRAIN, step)))
    }

    fn input(&self, layers: &VisionLayers, b: &Images, _trunk: &Trunk) -> Result<Input> {
        let pos = Tensor::arange(0u32, self.row_len() as u32, &Device::Cpu)?;
        let x = layers
            .patch_in
            .forward(&self.patches(b)?)?
            .broadcast_add(&layers.pos.forward(&pos)?)?;
        let masks = self.masks();
        Ok(Input {
            x,
            mask: masks[0].clone(),
            layer_masks: (masks.len() > 1).then_some(masks),
            bias: None,
        })
    }

    fn loss(&self, layers: &VisionLayers, hidden: &Tensor, b: &Images) -> Result<Tensor> {
        let logits = self.logits(layers, hidden)?;
        let labels = Tensor::from_slice(&b.labels, b.rows, &Device::Cpu)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
    }

    fn evaluate(
        &self,
        layers: &VisionLayers,
        forward: &mut dyn FnMut(&Images) -> Result<Tensor>,
    ) -> Result<TaskEval> {
        let h = &self.held_out;
        let n = self.settings.image * self.settings.image;
        let (mut loss, mut right) = (0.0, 0usize);
        let mut per_class = [(0usize, 0usize); CLASSES.len()];
        for start in (0..h.rows).step_by(EVAL_ROWS) {
            let rows = (h.rows - start).min(EVAL_ROWS);
            let b = Images {
                rows,
                pixels: h.pixels[start * n..(start + rows) * n].to_vec(),
                labels: h.labels[start..start + rows].to_vec(),
                centre: h.centre[start..start + rows].to_vec(),
            };
            let logits = self.logits(layers, &forward(&b)?)?;
            let labels = Tensor::from_slice(&b.labels, rows, &Device::Cpu)?;
            let l = candle_nn::loss::cross_entropy(&logits, &labels)?.to_scalar::<f32>()?;
            loss += l as f64 * rows as f64;
            let guess: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            for (g, &t) in guess.iter().zip(&b.labels) {
                per_class[t as usize].1 += 1;
                if *g == t {
                    right += 1;
                    per_class[t as usize].0 += 1;
                }
            }
        }
        let worst = per_class
            .iter()
            .enumerate()
            .filter(|(_, c)| c.1 > 0)
            .map(|(i, c)| (c.0 as f64 / c.1 as f64, i))
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
        Ok(TaskEval {
            loss: loss / h.rows as f64,
            metric: right as f64 / h.rows as f64,
            metric_name: "accuracy".into(),
            details: format!(
                "mask: {}; tiles skipped: {:.1}%; hardest class: {} ({:.1}%)",
                self.mask_words(),
                100.0 * self.tiles_skipped()?,
                CLASSES[worst.1],
                100.0 * worst.0
            ),
        })
    }

    fn summary(&self, metric: f64) -> String {
        let skipped = self.tiles_skipped().unwrap_or(f64::NAN);
        format!(
            "{:.1}% (chance: {:.1}%; {:.1}% of tiles skipped)",
            100.0 * metric,
            100.0 / CLASSES.len() as f64,
            100.0 * skipped
        )
    }

    fn describe(&self) -> String {
        let s = &self.settings;
        let (p, w) = (s.patch, self.window());
        let tokens = if w == p {
            format!("{p}×{p} patches as tokens")
        } else {
            format!("{p}×{p} patches as tokens, each embedded from the {w}×{w} pixels around it")
        };
        format!(
            "generated {}×{} images of {} classes (shapes and textures, noise {}), {tokens}; {}; {} held-out images",
            s.image,
            s.image,
            CLASSES.len(),
            s.noise,
            self.mask_words(),
            s.held_out
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's window: its patch and `overlap` pixels around it, from the image
    /// standardised (mean and spread computed here), zeros beyond the border.
    #[test]
    fn token_windows_overlap_their_neighbours_and_are_zero_beyond_the_image() {
        let s = VisionSettings {
            image: 8,
            patch: 2,
            overlap: 1,
            held_out: 1,
            mask: VisionMask::Full,
            ..VisionSettings::default()
        };
        let v = Vision::new(s, 0).unwrap();
        let pixels: Vec<f32> = (0..64).map(|i| (i * i % 37) as f32).collect();
        let mean = pixels.iter().sum::<f32>() / 64.0;
        let spread = (pixels.iter().map(|p| (p - mean).powi(2)).sum::<f32>() / 64.0).sqrt();
        let b = Images {
            rows: 1,
            pixels: pixels.clone(),
            labels: vec![0],
            centre: vec![0],
        };
        let t = v.patches(&b).unwrap();
        assert_eq!(t.dims(), &[1, 16, 16]);
        let got: Vec<Vec<f32>> = t.get(0).unwrap().to_vec2().unwrap();
        for gy in 0..4 {
            for gx in 0..4 {
                for y in 0..4 {
                    for x in 0..4 {
                        let (py, px) = (2 * gy + y, 2 * gx + x);
                        let want = if (1..=8).contains(&py) && (1..=8).contains(&px) {
                            (pixels[(py - 1) * 8 + px - 1] - mean) / spread
                        } else {
                            0.0
                        };
                        let g = got[gy * 4 + gx][y * 4 + x];
                        assert!(
                            (g - want).abs() < 1e-5,
                            "token ({gy},{gx}) pixel ({y},{x}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_overlap_past_half_the_image_is_refused() {
        let s = VisionSettings {
            image: 16,
            patch: 4,
            overlap: 9,
            held_out: 1,
            ..VisionSettings::default()
        };
        let e = Vision::new(s, 0).err().unwrap().to_string();
        assert!(e.contains("overlap (9 pixels)"), "{e}");
    }
}
