//! Pictures: the loss curve of a run, and a grid of attention heat maps (layers × heads).
//! SVG needs nothing; PNG draws text with a TrueType font from the system (DejaVu Sans from
//! Debian's fonts-dejavu-core, or the file in MASKATTN_FONT).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use maskattn_train::checkpoint::{Eval, State};

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font for "sans-serif" once; an error names where it looked.
fn font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("MASKATTN_FONT").into_iter().collect();
        paths.extend(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in &paths {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable font"));
            }
        }
        Err(format!(
            "no TrueType font found (looked in {}); install fonts-dejavu-core or set MASKATTN_FONT",
            paths.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws with an SVG or PNG backend chosen by the file's extension.
pub(super) fn draw(
    path: &Path,
    size: (u32, u32),
    f: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
    g: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    font()?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            root.fill(&WHITE)?;
            f(&root)?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", path.display()))
        }
        Some("png") => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            root.fill(&WHITE)?;
            g(&root)?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", path.display()))
        }
        _ => bail!("{}: pictures are written as .svg or .png", path.display()),
    }
}

/// Training loss per step (and its running mean) with held-out losses marked.
pub fn loss_curve(state: &State, path: &Path) -> Result<()> {
    let c = Curve {
        losses: &state.losses,
        evals: &state.evals,
        objective: format!("{:?}", state.run.objective).to_uppercase(),
    };
    draw(path, (900, 500), |r| curve(r, &c), |r| curve(r, &c))
}

/// What the loss picture shows.
struct Curve<'a> {
    losses: &'a [f32],
    evals: &'a [Eval],
    objective: String,
}

fn curve<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Curve) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let losses = c.losses;
    if losses.is_empty() {
        bail!("no training steps to draw");
    }
    // Non-finite values (a diverged loss, a perplexity of ∞) are left out: an axis that
    // ran to infinity would never finish drawing.
    let top = axis_top(losses.iter().copied(), 0.1);
    let objective = &c.objective;
    let metric = c.evals.first().map(|e| e.metric_name.clone());
    let percent = metric.as_deref().is_some_and(|m| m != "perplexity");
    let caption = match &metric {
        Some(m) => {
            format!("{objective} training loss (blue), held-out loss (red), held-out {m} (green)")
        }
        None => format!("{objective} training loss"),
    };
    let m_top = if percent {
        1.0
    } else {
        axis_top(c.evals.iter().map(|e| e.metric as f32), 1.0)
    };
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(0f32..losses.len() as f32, 0f32..top)
        .map_err(|e| anyhow!("{e}"))?
        .set_secondary_coord(0f32..losses.len() as f32, 0f32..m_top);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc(metric.clone().unwrap_or_default())
        .y_label_formatter(&|v| {
            if percent {
                format!("{:.0}%", 100.0 * v)
            } else {
                format!("{v:.1}")
            }
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for run in finite_runs(losses.iter().enumerate().map(|(i, &l)| (i as f32, l))) {
        chart
            .draw_series(LineSeries::new(run, RGBColor(180, 200, 230)))
            .map_err(|e| anyhow!("{e}"))?;
    }
    let w = 20usize;
    let mean = (0..losses.len()).map(|i| {
        let window = losses[i.saturating_sub(w - 1)..=i]
            .iter()
            .filter(|l| l.is_finite());
        let (s, n) = window.fold((0f32, 0usize), |(s, n), l| (s + l, n + 1));
        (i as f32, if n == 0 { f32::NAN } else { s / n as f32 })
    });
    for run in finite_runs(mean) {
        chart
            .draw_series(LineSeries::new(run, BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
    }
    let held_out = finite_runs(c.evals.iter().map(|e| (e.step as f32, e.loss as f32)));
    chart
        .draw_series(
            held_out
                .into_iter()
                .flatten()
                .map(|p| Circle::new(p, 5, RED.filled())),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let green = RGBColor(0, 150, 60);
    for run in finite_runs(c.evals.iter().map(|e| (e.step as f32, e.metric as f32))) {
        chart
            .draw_secondary_series(LineSeries::new(run.clone(), green.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_secondary_series(run.into_iter().map(|p| Circle::new(p, 4, green.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// The top of an axis that shows the finite `values` (at least `least`), with a margin.
fn axis_top(values: impl Iterator<Item = f32>, least: f32) -> f32 {
    let max = values.filter(|v| v.is_finite()).fold(least, f32::max);
    (max * 1.05).min(f32::MAX)
}

/// The stretches of consecutive finite points: a line is drawn through each, with a gap
/// where a value is NaN or infinite.
fn finite_runs(points: impl Iterator<Item = (f32, f32)>) -> Vec<Vec<(f32, f32)>> {
    let mut runs = vec![Vec::new()];
    for (x, y) in points {
        if y.is_finite() {
            runs.last_mut().expect("never empty").push((x, y));
        } else if !runs.last().expect("never empty").is_empty() {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// One heat map per (layer, head): weights `[L, L]` per map, `allowed` says which pairs the
/// mask lets through (hidden pairs are drawn in a hatch grey, not as zero weight).
pub struct Maps<'a> {
    pub tokens: &'a [String],
    /// `[layer][head][i][j]`
    pub weights: &'a [Vec<Vec<Vec<f32>>>],
    pub allowed: &'a dyn Fn(usize, usize) -> bool,
    pub title: String,
}

pub fn attention_maps(maps: &Maps, path: &Path) -> Result<()> {
    let layers = maps.weights.len();
    let heads = maps.weights.first().map_or(0, Vec::len);
    let n = maps.tokens.len();
    let cell = (400 / n.max(1)).clamp(6, 18) as u32;
    let label = if cell >= 10 { 90 } else { 10 };
    let map_px = cell * n as u32;
    let (w, h) = (
        (map_px + label + 20) * heads as u32 + 20,
        (map_px + label + 40) * layers as u32 + 60,
    );
    draw(
        path,
        (w, h),
        |r| heat(r, maps, cell, label),
        |r| heat(r, maps, cell, label),
    )
}

#[allow(clippy::needless_range_loop)]
fn heat<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    maps: &Maps,
    cell: u32,
    label: u32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = maps.tokens.len();
    let map_px = (cell * n as u32) as i32;
    let font = ("sans-serif", (cell as f64 * 0.8).clamp(8.0, 14.0)).into_font();
    root.draw(&Text::new(
        maps.title.clone(),
        (20, 15),
        ("sans-serif", 20).into_font(),
    ))
    .map_err(|e| anyhow!("{e}"))?;
    for (l, layer) in maps.weights.iter().enumerate() {
        for (hd, w) in layer.iter().enumerate() {
            let x0 = 20 + hd as i32 * (map_px + label as i32 + 20) + label as i32;
            let y0 = 60 + l as i32 * (map_px + label as i32 + 40);
            root.draw(&Text::new(
                format!("layer {l}, head {hd}"),
                (x0, y0 - 22),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(|e| anyhow!("{e}"))?;
            let max = w.iter().flatten().cloned().fold(1e-9f32, f32::max);
            for i in 0..n {
                for j in 0..n {
                    let (x, y) = (x0 + (j as u32 * cell) as i32, y0 + (i as u32 * cell) as i32);
                    let rect = [(x, y), (x + cell as i32 - 1, y + cell as i32 - 1)];
                    let color = if (maps.allowed)(i, j) {
                        // White (0) to dark blue (the map's largest weight).
                        let t = (w[i][j] / max).clamp(0.0, 1.0);
                        RGBColor(
                            (255.0 * (1.0 - t)) as u8,
                            (255.0 * (1.0 - 0.85 * t)) as u8,
                            255 - (90.0 * t) as u8,
                        )
                    } else {
                        RGBColor(215, 205, 190)
                    };
                    root.draw(&Rectangle::new(rect, color.filled()))
                        .map_err(|e| anyhow!("{e}"))?;
                    if !(maps.allowed)(i, j) && cell >= 8 {
                        // A diagonal stroke marks a pair the mask hides.
                        root.draw(&PathElement::new(
                            vec![(x, y + cell as i32 - 1), (x + cell as i32 - 1, y)],
                            RGBColor(160, 150, 135),
                        ))
                        .map_err(|e| anyhow!("{e}"))?;
                    }
                }
            }
            if cell >= 10 {
                for (i, t) in maps.tokens.iter().enumerate() {
                    // Queries down the left, keys along the bottom.
                    let yc = y0 + (i as u32 * cell) as i32 + cell as i32 / 2 - 5;
                    root.draw(&Text::new(
                        t.clone(),
                        (x0 - label as i32 + 2, yc),
                        font.clone(),
                    ))
                    .map_err(|e| anyhow!("{e}"))?;
                    let xc = x0 + (i as u32 * cell) as i32 + 2;
                    root.draw(&Text::new(t.clone(), (xc, y0 + map_px + 4), font.clone()))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An infinite perplexity (or loss) must not send the axes to infinity: the picture
    /// is drawn, with the finite points.
    #[test]
    fn non_finite_points_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let eval = |step, loss, metric| Eval {
            step,
            loss,
            metric,
            metric_name: "perplexity".into(),
        };
        let evals = [
            eval(0, 5.0, 150.0),
            eval(2, 800.0, f64::INFINITY),
            eval(3, f64::NAN, f64::NAN),
        ];
        let losses = [5.0, f32::INFINITY, f32::NAN, 3.0];
        let c = Curve {
            losses: &losses,
            evals: &evals,
            objective: "CLM".into(),
        };
        for name in ["loss.svg", "loss.png"] {
            let path = dir.path().join(name);
            draw(&path, (900, 500), |r| curve(r, &c), |r| curve(r, &c)).unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() > 1000, "{name}");
        }
        let nothing = [f32::NAN; 3];
        let c = Curve {
            losses: &nothing,
            evals: &[],
            objective: "CLM".into(),
        };
        let path = dir.path().join("nothing.svg");
        draw(&path, (900, 500), |r| curve(r, &c), |r| curve(r, &c)).unwrap();
    }
}
