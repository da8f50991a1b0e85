//! The vision task's picture: one held-out image beside one patch's attention over it
//! (the last layer's, averaged over the heads), the patches its mask hides hatched.

use std::path::Path;

use anyhow::{anyhow, Result};
use maskattn::MaskShape;
use maskattn_train::task::vision::{Vision, CLASSES};
use maskattn_train::task::{Task, TaskTrainer};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::plot::draw;

/// Screen pixels per image pixel.
const SCALE: u32 = 6;

/// What the picture shows, computed from the trained model.
pub struct PatchAttention {
    /// `[side, side]` pixel values.
    pixels: Vec<f32>,
    side: usize,
    patch: usize,
    /// The query patch (raster index on the grid) and its weights over the patches.
    query: usize,
    weights: Vec<f32>,
    /// Whether the last layer's mask lets the query see each patch.
    allowed: Vec<bool>,
    title: String,
}

impl PatchAttention {
    /// Held-out image `i`, its object's centre patch as the query.
    pub fn of(t: &TaskTrainer<Vision>, i: usize) -> Result<Self> {
        let task = t.task();
        let s = task.settings();
        let b = task.held_out_image(i);
        let layers = t.encoder().trunk().layers;
        let last = layers - 1;
        // [1, H, L, L] → the query's row, averaged over the heads.
        let w = t.attention_weights(&b, last)?;
        let query = b.centre[0];
        let weights: Vec<f32> = w.get(0)?.mean(0)?.get(query)?.to_vec1()?;
        let masks = task.masks();
        let mask = &masks[last % masks.len()];
        let l = task.row_len();
        let shape = MaskShape::new(1, 1, l, l);
        let allowed = (0..l)
            .map(|j| mask.allowed(&shape, 0, 0, query, j))
            .collect();
        let g = task.grid();
        Ok(PatchAttention {
            pixels: b.pixels,
            side: s.image,
            patch: s.patch,
            query,
            weights,
            allowed,
            title: format!(
                "held-out image ({}); layer {} attention of patch ({}, {}), mean over heads; {}; hatched: hidden by the mask",
                CLASSES[b.labels[0] as usize],
                layers,
                query / g,
                query % g,
                mask
            ),
        })
    }

    /// Writes the picture (`.png` or `.svg`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let panel = self.side as u32 * SCALE;
        let size = (2 * panel + 60, panel + 70);
        draw(path, size, |r| self.paint(r), |r| self.paint(r))
    }

    fn paint<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
        let font = ("sans-serif", 13).into_font();
        root.draw(&Text::new(self.title.clone(), (10, 8), font.clone()))
            .map_err(e)?;
        let panel = (self.side as u32 * SCALE) as i32;
        let (x0, y0, x1) = (20, 50, 40 + panel);
        root.draw(&Text::new("image", (x0, 30), font.clone()))
            .map_err(e)?;
        root.draw(&Text::new("attention (red: more)", (x1, 30), font))
            .map_err(e)?;
        let (lo, hi) = self
            .pixels
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let max = self.weights.iter().cloned().fold(1e-12f32, f32::max);
        let g = self.side / self.patch;
        let s = SCALE as i32;
        for y in 0..self.side {
            for x in 0..self.side {
                let v = (self.pixels[y * self.side + x] - lo) / (hi - lo).max(1e-6);
                let grey = (255.0 * v.clamp(0.0, 1.0)) as u8;
                let (px, py) = (x as i32 * s, y as i32 * s);
                let rect = |ox: i32| [(ox + px, y0 + py), (ox + px + s - 1, y0 + py + s - 1)];
                root.draw(&Rectangle::new(
                    rect(x0),
                    RGBColor(grey, grey, grey).filled(),
                ))
                .map_err(e)?;
                // The image faded to a light grey, then tinted red by the weight.
                let j = (y / self.patch) * g + x / self.patch;
                let t = if self.allowed[j] {
                    (self.weights[j] / max).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let base = 150.0 + 0.4 * grey as f32;
                let c = RGBColor(
                    (base + (255.0 - base) * t) as u8,
                    (base * (1.0 - 0.85 * t)) as u8,
                    (base * (1.0 - 0.85 * t)) as u8,
                );
                root.draw(&Rectangle::new(rect(x1), c.filled()))
                    .map_err(e)?;
            }
        }
        let cell = (self.patch as u32 * SCALE) as i32;
        for j in 0..g * g {
            let (cx, cy) = (x1 + (j % g) as i32 * cell, y0 + (j / g) as i32 * cell);
            if !self.allowed[j] {
                // Two diagonal strokes per hidden patch: the hatching.
                for k in [0, cell / 2] {
                    root.draw(&PathElement::new(
                        vec![(cx + k, cy + cell - 1), (cx + cell - 1, cy + k)],
                        RGBColor(90, 90, 90),
                    ))
                    .map_err(e)?;
                    root.draw(&PathElement::new(
                        vec![(cx, cy + cell - 1 - k), (cx + cell - 1 - k, cy)],
                        RGBColor(90, 90, 90),
                    ))
                    .map_err(e)?;
                }
            }
            if j == self.query {
                for ox in [x0, x1] {
                    let (qx, qy) = (ox + (j % g) as i32 * cell, cy);
                    root.draw(&Rectangle::new(
                        [(qx - 1, qy - 1), (qx + cell, qy + cell)],
                        ShapeStyle::from(&BLUE).stroke_width(2),
                    ))
                    .map_err(e)?;
                }
            }
        }
        Ok(())
    }
}
