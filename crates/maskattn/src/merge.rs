//! Partial results over disjoint key sets merged into one: `(O_a, LSE_a) ⊕ (O_b, LSE_b)`.
//!
//! This is what context parallelism (ring attention) does with the forward of each key
//! block, and it is the rule the decode path merges its key chunks with. So it goes through
//! that same code, [`Online::merge`] then [`Online::finish`], not a restatement: a part's
//! `(O, LSE)` is the online state `m = LSE`, `l = 1`, `acc = O` (`e^(m − LSE) = 1`), and a
//! part whose LSE is −∞ saw nothing (`l = 0`) and adds nothing.

use rayon::prelude::*;

use crate::error::{mismatch, AttnError, Result};
use crate::softmax::OnlineBufs;

/// Rows merged per task: enough work to pay for a task, small scratch.
const ROWS: usize = 64;

/// `(out, lse) ← (out, lse) ⊕ (part_out, part_lse)`, in place: the attention over the union of
/// two disjoint key sets from the attention over each (docs/design.md section 1, "Blocks of a
/// larger problem"). `out` and `part_out` are contiguous `[B, H, L_q, d]` (any leading shape:
/// rows of `d` values), `lse` and `part_lse` `[B, H, L_q]`, one entry per row, as
/// [`forward`](crate::forward) returns them.
///
/// Per row: `LSE = logaddexp(LSE_a, LSE_b)`, `O = e^(LSE_a − LSE) O_a + e^(LSE_b − LSE) O_b`.
/// A side whose LSE is −∞ (its keys were all hidden from the row) is not read, so merging with
/// it leaves the other side unchanged bit for bit, and a row empty on both sides stays
/// `O = 0`, `LSE = −∞` — never NaN. A NaN or +∞ LSE on either side (a forward that met a NaN or
/// +∞ score) makes the row's `O` and `LSE` NaN, as the forward over all keys would.
///
/// Attention sinks: a sink is a part of its own, with no value — run the blocks' forwards
/// without it and merge `(O = 0, LSE = sink_h)` once per row (a sink in every block's forward
/// would count once per block).
pub fn merge_partials(
    out: &mut [f32],
    lse: &mut [f32],
    part_out: &[f32],
    part_lse: &[f32],
    d: usize,
) -> Result<()> {
    if d == 0 {
        return Err(AttnError::ZeroDim { what: "head dim d" });
    }
    let rows = lse.len();
    let want = rows.checked_mul(d).ok_or(AttnError::SizeOverflow {
        name: "merge_partials",
        what: "values",
        factors: vec![rows, d],
    })?;
    for (name, len, n) in [
        ("out", out.len(), want),
        ("part_lse", part_lse.len(), rows),
        ("part_out", part_out.len(), want),
    ] {
        if len != n {
            return Err(mismatch(format!(
                "merge_partials: {name} holds {len} values, expected {n} (lse has {rows} rows of d = {d})"
            )));
        }
    }
    out.par_chunks_mut(ROWS * d)
        .zip(lse.par_chunks_mut(ROWS))
        .zip(part_out.par_chunks(ROWS * d).zip(part_lse.par_chunks(ROWS)))
        .for_each(|((out, lse), (part_out, part_lse))| {
            let rows = lse.len();
            let mut all = state(out, lse, d);
            let mut all = all.online();
            all.merge(&[state(part_out, part_lse, d)], rows, d);
            all.finish(d, d, out, lse);
        });
    Ok(())
}

/// The online state of finished rows: `m = LSE`, `acc = O`, and `l = 1` (`O` is already
/// normalised); where LSE is −∞ the row saw nothing: `l = 0` and `acc = 0`, as `merge`
/// expects of such a state, whatever `O` holds there; `l` is NaN where LSE is NaN or +∞ (a
/// NaN sum).
fn state(out: &[f32], lse: &[f32], d: usize) -> OnlineBufs {
    let mut acc = out.to_vec();
    let l = lse
        .iter()
        .zip(acc.chunks_mut(d))
        .map(|(&x, acc)| match x {
            f32::NEG_INFINITY => {
                acc.fill(0.0);
                0.0
            }
            x if x.is_finite() => 1.0,
            _ => f32::NAN,
        })
        .collect();
    OnlineBufs {
        m: lse.to_vec(),
        l,
        acc,
    }
}
