//! The score modifiers of one call (docs/design.md section 1, "Score modifiers") as Python
//! hands them over: each parameter tensor a contiguous f32 buffer read in place, and the
//! buffers for their gradients.

use maskattn::{Bias, Dropout, ParamGradsMut, Params, RelBias};

use crate::raw::{RawOut, RawTensor};

/// `(softcap, alibi slopes [H_q], sinks [H_q], bias (data, dims), T5 table
/// (data [num_buckets, H_q], num_buckets, max_distance, bidirectional), dropout (p, seed))`,
/// each `None` when the call does not have it.
#[derive(pyo3::FromPyObject, Clone, Copy, Default)]
pub struct Mods(
    pub Option<f32>,
    pub Option<RawOut>,
    pub Option<RawOut>,
    pub Option<(RawOut, [usize; 4])>,
    pub Option<(RawOut, usize, usize, bool)>,
    pub Option<(f32, u64)>,
);

/// Buffers for `(dbias, dalibi, dsinks, drel)`, `None` where autograd does not want one.
#[derive(pyo3::FromPyObject, Clone, Copy, Default)]
pub struct ModGrads(
    pub Option<RawOut>,
    pub Option<RawOut>,
    pub Option<RawOut>,
    pub Option<RawOut>,
);

impl Mods {
    /// The parameter buffers, read by the kernels (for the overlap check).
    pub fn inputs(&self) -> Vec<RawTensor> {
        [self.1, self.2, self.3.map(|b| b.0), self.4.map(|r| r.0)]
            .into_iter()
            .flatten()
            .map(RawOut::as_tensor)
            .collect()
    }

    /// The kernels' [`Params`] with these modifiers added to `base`.
    ///
    /// # Safety
    /// Every buffer must point at its number of live f32 values that nothing writes while
    /// the returned `Params` lives (the Python caller holds the tensors).
    pub unsafe fn params<'a>(&self, base: Params<'a>) -> Result<Params<'a>, String> {
        let mut p = Params {
            softcap: self.0,
            ..base
        };
        if let Some(a) = self.1 {
            p.alibi = Some(a.slice("alibi_slopes")?);
        }
        if let Some(s) = self.2 {
            p.sinks = Some(s.slice("sinks")?);
        }
        if let Some((b, dims)) = self.3 {
            p.bias = Some(Bias::new(b.slice("bias")?, dims).map_err(|e| e.to_string())?);
        }
        if let Some((t, n, max_distance, bidirectional)) = self.4 {
            let table = t.slice("relative bias table")?;
            p.rel = Some(
                RelBias::new(table, n, max_distance, bidirectional).map_err(|e| e.to_string())?,
            );
        }
        if let Some((prob, seed)) = self.5 {
            p.dropout = Some(Dropout::new(prob, seed).map_err(|e| e.to_string())?);
        }
        Ok(p)
    }
}

impl ModGrads {
    pub fn outputs(&self) -> Vec<RawOut> {
        [self.0, self.1, self.2, self.3]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The kernels' gradient buffers.
    ///
    /// # Safety
    /// As [`RawOut::slice_mut`]: fresh buffers, disjoint from the call's other tensors.
    pub unsafe fn slices<'a>(&self) -> Result<ParamGradsMut<'a>, String> {
        let take = |b: Option<RawOut>, name| b.map(|b| b.slice_mut(name)).transpose();
        Ok(ParamGradsMut {
            dbias: take(self.0, "dbias")?,
            dalibi: take(self.1, "dalibi")?,
            dsinks: take(self.2, "dsinks")?,
            drel: take(self.3, "drel")?,
        })
    }
}
