//! Draws a task's [`Figure`]s (line charts described by the training library): panels in a
//! grid, each line coloured by its role, baselines dashed, a legend in the first panel.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use maskattn_train::durable;
use maskattn_train::task::{Figure, Panel, Role};

use super::plot::draw;

/// Panels side by side before a new row starts.
const COLUMNS: usize = 2;
const PANEL_W: u32 = 560;
const PANEL_H: u32 = 280;

/// `fig` as a picture at `path` (`.png` or `.svg`).
pub fn draw_figure(fig: &Figure, path: &Path) -> Result<()> {
    let cols = fig.panels.len().clamp(1, COLUMNS);
    let rows = fig.panels.len().div_ceil(cols).max(1);
    let size = (PANEL_W * cols as u32, PANEL_H * rows as u32 + 40);
    draw(path, size, |r| chart(r, fig), |r| chart(r, fig))
}

/// Every figure of a finished task run, as `NAME.png` and `NAME.svg` in `out`; returns
/// the SVGs' paths. Like the loss pictures they are a convenience: a failure is a warning.
pub fn write_figures(figs: &[Figure], out: &Path) -> Vec<PathBuf> {
    let mut written = Vec::new();
    for fig in figs {
        for ext in ["png", "svg"] {
            let p = out.join(format!("{}.{ext}", fig.name));
            match durable::replace_with(&p, |tmp| draw_figure(fig, tmp)) {
                Ok(()) if ext == "svg" => written.push(p),
                Ok(()) => {}
                Err(e) => eprintln!("warning: no {}: {e:#}", p.display()),
            }
        }
    }
    written
}

fn style(role: Role) -> (RGBColor, u32) {
    match role {
        Role::History => (RGBColor(110, 110, 110), 1),
        Role::Truth => (BLACK, 2),
        Role::Model => (RGBColor(215, 40, 40), 2),
        Role::Baseline => (RGBColor(30, 90, 200), 2),
    }
}

fn chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, fig: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let root = root
        .titled(&fig.title, ("sans-serif", 20))
        .map_err(|e| anyhow!("{e}"))?;
    let cols = fig.panels.len().clamp(1, COLUMNS);
    let rows = fig.panels.len().div_ceil(cols).max(1);
    let areas = root.split_evenly((rows, cols));
    for (i, (panel, area)) in fig.panels.iter().zip(&areas).enumerate() {
        draw_panel(area, fig, panel, i == 0)?;
    }
    Ok(())
}

/// The range of the finite `values` with a margin (a flat line gets a unit range).
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    (lo - pad, hi + pad)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    panel: &Panel,
    legend: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points = || panel.lines.iter().flat_map(|l| l.points.iter());
    let (x0, x1) = range(points().map(|p| p.0));
    let (y0, y1) = range(points().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(50)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc(fig.x_label.as_str())
        .y_desc(fig.y_label.as_str())
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(x) = panel.divider {
        let grey = RGBColor(190, 190, 190);
        chart
            .draw_series(LineSeries::new([(x, y0), (x, y1)], grey))
            .map_err(|e| anyhow!("{e}"))?;
    }
    for line in &panel.lines {
        let (color, width) = style(line.role);
        let pts = line
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite());
        let shape = color.stroke_width(width);
        let drawn = if line.role == Role::Baseline {
            chart.draw_series(DashedLineSeries::new(pts, 8, 5, shape))
        } else {
            chart.draw_series(LineSeries::new(pts, shape))
        }
        .map_err(|e| anyhow!("{e}"))?;
        if legend {
            drawn.label(line.label.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width))
            });
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}
