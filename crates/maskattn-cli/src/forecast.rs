//! `maskattn forecast`: the next values of a user's series from a checkpoint of `train --task
//! series` — the library's [`Forecaster`]; here the flags, the printing and the files.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use maskattn_train::task::series_csv::{self, Table};
use maskattn_train::task::series_forecast::Forecaster;

use crate::train::figure::draw_figure;

#[derive(Args, Debug)]
pub struct ForecastArgs {
    /// A checkpoint folder of `maskattn train --task series` (generated or --csv series).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The series: a CSV file with a header row and one column per variate, as `train
    /// --csv` reads; every column ends at the last row and is forecast from there.
    #[arg(long)]
    pub csv: PathBuf,
    /// Values to forecast: a multiple of the model's patch, the forecasts fed back past
    /// the first patch [default: one patch, 8 values].
    #[arg(long)]
    pub horizon: Option<usize>,
    /// Write the forecasts as CSV: a header of the columns' names, a row per step ahead.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw each column's recent values and its forecast (.png or .svg).
    #[arg(long)]
    pub picture: Option<PathBuf>,
}

pub fn run(a: &ForecastArgs) -> Result<()> {
    if let Some(p) = &a.picture {
        if !matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "svg")) {
            bail!(
                "--picture {}: pictures are written as .png or .svg",
                p.display()
            );
        }
    }
    let f = Forecaster::open(&a.checkpoint)?;
    let table = Table::read_all(&a.csv)?;
    let horizon = a.horizon.unwrap_or(f.settings().patch);
    let forecast = f.forecast(&table, horizon)?;
    if let Some(out) = &a.out {
        let text = series_csv::to_csv(&table.names, &forecast)?;
        crate::output::write_bytes(out, text.as_bytes())?;
    }
    if let Some(p) = &a.picture {
        let fig = f.figure(&table, &forecast);
        crate::output::write_with(p, |tmp| draw_figure(&fig, tmp))?;
    }
    let contexts: Vec<usize> = table
        .values
        .iter()
        .map(|v| f.context_len(v.len()))
        .collect();
    eprintln!(
        "{}: {} columns, {} rows; forecast from the last {} values of each (model at step {}, patches of {})",
        a.csv.display(),
        table.names.len(),
        table.rows,
        span(&contexts),
        f.step(),
        f.settings().patch
    );
    // The forecasts as a table, a row per step ahead (the row number it would have).
    let width = table
        .names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let mut head = format!("{:>6}", "row");
    for n in &table.names {
        head += &format!("  {n:>width$}");
    }
    println!("{head}");
    for r in 0..horizon {
        let mut line = format!("{:>6}", table.rows + r);
        for c in &forecast {
            line += &format!("  {:>width$.4}", c[r]);
        }
        println!("{line}");
    }
    if let Some(out) = &a.out {
        eprintln!("wrote {}", out.display());
    }
    if let Some(p) = &a.picture {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// "32" or "32 to 96".
fn span(v: &[usize]) -> String {
    let (lo, hi) = (v.iter().min(), v.iter().max());
    match (lo, hi) {
        (Some(lo), Some(hi)) if lo != hi => format!("{lo} to {hi}"),
        (Some(lo), _) => lo.to_string(),
        _ => "0".into(),
    }
}
