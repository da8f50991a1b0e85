//! A user's series for the `series` task: a CSV file with a header row and one column per
//! variate, read with the `csv` crate. A variate may start later than others (empty cells
//! before its first value) but has no gaps after it. The first 80% of the rows train (a
//! training sample's forecast ends there); held-out samples forecast values after them.
//! `maskattn forecast` reads its file with the same rules ([`Table::read_all`]).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::rng::Rng;

/// The file's variates: name, the row of the first value, the values from there on.
pub struct Table {
    pub names: Vec<String>,
    pub start: Vec<usize>,
    pub values: Vec<Vec<f64>>,
    /// Rows in all, and the first row whose value only held-out forecasts predict.
    pub rows: usize,
    pub split: usize,
}

impl Table {
    /// The file for training: its first 80% must hold a variate's `min_context` values and
    /// `horizon` to forecast, the rest `horizon` more.
    pub fn read(path: &Path, min_context: usize, horizon: usize) -> Result<Table> {
        let t = Table::read_all(path)?;
        let (rows, split) = (t.rows, t.split);
        let longest = t.start.iter().min().copied().unwrap_or(0);
        if split < longest + min_context + horizon || rows - split < horizon {
            bail!(
                "--csv {}: {rows} rows are too few: the first 80% must hold a variate's {min_context} context values and {horizon} to forecast, the rest {horizon} more",
                path.display()
            );
        }
        Ok(t)
    }

    /// The file's columns, whatever their lengths (every variate ends at the last row).
    pub fn read_all(path: &Path) -> Result<Table> {
        let what = || format!("--csv {}", path.display());
        let mut r = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_path(path)
            .with_context(what)?;
        let names: Vec<String> = r
            .headers()
            .with_context(what)?
            .iter()
            .map(str::to_string)
            .collect();
        if names.is_empty() {
            bail!("{}: no columns", what());
        }
        let mut cols: Vec<Vec<Option<f64>>> = vec![Vec::new(); names.len()];
        for (i, rec) in r.records().enumerate() {
            let rec = rec.with_context(what)?;
            for (c, col) in cols.iter_mut().enumerate() {
                let cell = rec.get(c).unwrap_or("").trim();
                col.push(if cell.is_empty() {
                    None
                } else {
                    let v: f64 = cell
                        .parse()
                        .ok()
                        .filter(|v: &f64| v.is_finite())
                        .with_context(|| {
                            format!(
                                "{}: row {}, column `{}`: `{cell}` is not a finite number",
                                what(),
                                i + 2,
                                names[c]
                            )
                        })?;
                    Some(v)
                });
            }
        }
        let rows = cols[0].len();
        let mut start = Vec::new();
        let mut values = Vec::new();
        for (c, col) in cols.iter().enumerate() {
            let Some(first) = col.iter().position(Option::is_some) else {
                bail!("{}: column `{}` has no values", what(), names[c]);
            };
            if let Some(gap) = col[first..].iter().position(Option::is_none) {
                bail!(
                    "{}: column `{}` has an empty cell at row {} after its first value",
                    what(),
                    names[c],
                    first + gap + 2
                );
            }
            start.push(first);
            values.push(col[first..].iter().map(|v| v.expect("no gaps")).collect());
        }
        Ok(Table {
            names,
            start,
            values,
            rows,
            split: rows * 4 / 5,
        })
    }

    /// A window: up to `most` variates with at least `min_context` values before the
    /// forecast of `horizon` values that ends at a row drawn in the training part or, when
    /// `held_out`, after it; each variate's context `min_context..=max_context` values
    /// (whole patches: multiples of `step`). Returns (context, target) per variate.
    #[allow(clippy::too_many_arguments)]
    pub fn window(
        &self,
        rng: &mut Rng,
        held_out: bool,
        most: usize,
        min_context: usize,
        max_context: usize,
        horizon: usize,
        step: usize,
    ) -> Vec<(Vec<f64>, Vec<f64>)> {
        // The forecast covers rows `end - horizon .. end`.
        let (lo, hi) = if held_out {
            (self.split + horizon, self.rows)
        } else {
            (horizon, self.split)
        };
        loop {
            let end = lo + rng.below(hi - lo + 1);
            let from = end - horizon;
            let mut ok: Vec<usize> = (0..self.values.len())
                .filter(|&c| from >= self.start[c] + min_context)
                .collect();
            if ok.is_empty() {
                continue; // too early for every variate: draw again (the first 80% holds one).
            }
            for i in (1..ok.len()).rev() {
                ok.swap(i, rng.below(i + 1));
            }
            ok.truncate(most);
            return ok
                .into_iter()
                .map(|c| {
                    let have = (from - self.start[c]).min(max_context) / step;
                    let lo_p = min_context / step;
                    let n = lo_p + rng.below(have - lo_p + 1);
                    let v = &self.values[c];
                    let at = from - self.start[c];
                    (v[at - n * step..at].to_vec(), v[at..at + horizon].to_vec())
                })
                .collect();
        }
    }
}

/// `columns` (of equal length) as CSV text in the reader's format: a header of `names`,
/// then a row per index; values as Rust prints them (the shortest that reads back exactly).
pub fn to_csv(names: &[String], columns: &[Vec<f64>]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(names)?;
    let rows = columns.first().map_or(0, Vec::len);
    for r in 0..rows {
        w.write_record(columns.iter().map(|c| c[r].to_string()))?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}
