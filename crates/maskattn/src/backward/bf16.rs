//! The backward's five products on AVX512-BF16 pairs (see `simd::bf16dot`), for bf16
//! storage whose output gradient `dO` is bf16 as well (every value exactly a bf16 — what a
//! framework training in bf16 hands over). `P` and `dS` are rounded to bf16 for their
//! products, as PyTorch's flash kernel does; everything else is f32 as on the f32 path.
//!
//! The products reduce over three different dimensions, and a pair-product needs its
//! reduction dimension in pairs, so the operands come in these layouts:
//!
//! | product          | reduces over | A (bf16 rows)         | B (pairs)                 |
//! | ---------------- | ------------ | --------------------- | ------------------------- |
//! | `x  = s·Q·Kᵀ`    | features     | Q rows                | `Kᵀ` over features        |
//! | `dP = dO·Vᵀ`     | features     | dO rows               | `Vᵀ` over features        |
//! | `dVᵀ += dOᵀ·P`   | query rows   | `dOᵀ` rows            | P over query rows         |
//! | `dKᵀ += Qᵀ·dS`   | query rows   | `Qᵀ` rows             | dS over query rows        |
//! | `dQ += dS·K`     | keys         | dS rows               | K over keys               |
//!
//! `dK` and `dV` are accumulated transposed (features × keys) so that `P` and `dS` are the
//! pair-interleaved operand, which vector code builds from their rows; they are transposed
//! back (and `dK` scaled by `s`) once per key tile.

use super::{ds_rows, Geom};
use crate::gemm::{gemm_visible, Strided};
use crate::pack;
use crate::params::DropTile;
use crate::simd::{bf16dot, Avx512};
use crate::tile::visible;

/// The query-side operands of every (b, query head, query tile), made once per call.
pub(super) struct QuerySide {
    /// `[B·H_q·n_q] × (tq × d_pad)`: Q and dO rows.
    pub q: Vec<u16>,
    pub dout: Vec<u16>,
    /// `[B·H_q·n_q] × (d_pad × tq_pad)`: Qᵀ and dOᵀ, query rows padded to even.
    pub qt: Vec<u16>,
    pub doutt: Vec<u16>,
    pub tq_pad: usize,
}

/// One key tile's operands (see the table above).
pub(super) struct KeySide {
    /// `d_pad/2 × tk_pad` pairs each.
    pub kt: Vec<u32>,
    pub vt: Vec<u32>,
    /// `tk_pad/2 × d_pad` pairs.
    pub k: Vec<u32>,
    pub k_finite: bool,
    /// `k` with the keys a query tile doesn't see zeroed, and as f32 rows (`tk_pad × d_pad`).
    pub k_fix: Vec<u32>,
    pub k_f32: Vec<f32>,
    /// Accumulated `dKᵀ`, `dVᵀ` (`d_pad × tk_pad`).
    pub dkt: Vec<f32>,
    pub dvt: Vec<f32>,
}

impl KeySide {
    pub fn new(g: &Geom) -> Self {
        let n = g.d_pad * g.tk_pad;
        KeySide {
            kt: vec![0; n / 2],
            vt: vec![0; n / 2],
            k: vec![0; n / 2],
            k_finite: true,
            k_fix: vec![0; n / 2],
            k_f32: vec![0.0; n],
            dkt: vec![0.0; n],
            dvt: vec![0.0; n],
        }
    }

    /// `dK = s · (dKᵀ)ᵀ`, `dV = (dVᵀ)ᵀ` into `tk_pad × d_pad` tiles.
    pub fn transpose_into(&self, g: &Geom, scale: f32, dk: &mut [f32], dv: &mut [f32]) {
        for x in 0..g.d_pad {
            for c in 0..g.tk_pad {
                dk[c * g.d_pad + x] = scale * self.dkt[x * g.tk_pad + c];
                dv[c * g.d_pad + x] = self.dvt[x * g.tk_pad + c];
            }
        }
    }
}

/// Per-task scratch of the bf16 step.
pub(super) struct Work16 {
    /// P (or P ∘ z) and dS interleaved over query rows: `tq_pad/2 × tk_pad` pairs.
    pub pi: Vec<u32>,
    pub dsi: Vec<u32>,
    /// dS rows in bf16: `tq × tk_pad`.
    pub ds16: Vec<u16>,
    pub seen: Vec<u64>,
}

impl Work16 {
    pub fn new(g: &Geom, tq_pad: usize) -> Self {
        Work16 {
            pi: vec![0; tq_pad / 2 * g.tk_pad],
            dsi: vec![0; tq_pad / 2 * g.tk_pad],
            ds16: vec![0; tq_pad * g.tk_pad],
            seen: vec![0; g.words],
        }
    }
}

/// The query side of one (query tile, key tile) pair.
pub(super) struct QueryTile<'a> {
    pub rows: usize,
    pub cols: usize,
    pub lse: &'a [f32],
    pub delta: &'a [f32],
    pub q: &'a [u16],
    pub dout: &'a [u16],
    pub qt: &'a [u16],
    pub doutt: &'a [u16],
    pub tq_pad: usize,
    pub bits: Option<&'a [u64]>,
    pub bias: Option<&'a [f32]>,
    pub drop: Option<DropTile<'a>>,
    pub scale: f32,
    /// Every Q and dO value of the tile is finite.
    pub rows_finite: bool,
}

/// The five products of one pair; `dq` receives `dS·K` (the caller applies `s`), `ks`
/// accumulates `dKᵀ` (unscaled) and `dVᵀ`.
///
/// # Safety
/// `bf16dot::enabled()`; every buffer sized as documented on its type.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn step(
    g: &Geom,
    t: &QueryTile,
    ks: &mut KeySide,
    w: &mut Work16,
    p: &mut [f32],
    pz: &mut [f32],
    ds: &mut [f32],
    dq: &mut [f32],
) {
    let (rows, cols, tk_pad, d_pad) = (t.rows, t.cols, g.tk_pad, g.d_pad);
    let (fp, rp) = (d_pad / 2, t.tq_pad / 2);
    // SAFETY: AVX512-BF16 is this function's contract; the operands are sized by
    // `QuerySide`, `KeySide::new`, `Work16::new` and the f32 path's `Scratch`, as the
    // products below read them (the layouts table above).
    unsafe {
        // Q·Kᵀ (scaled in `ds_rows`, as on every path) ; dP = dO·Vᵀ
        let (q, dout) = (t.q.as_ptr().cast(), t.dout.as_ptr().cast());
        bf16dot::gemm(
            rows,
            tk_pad,
            fp,
            q,
            fp,
            ks.kt.as_ptr(),
            tk_pad,
            p.as_mut_ptr(),
            tk_pad,
            false,
        );
        bf16dot::gemm(
            rows,
            tk_pad,
            fp,
            dout,
            fp,
            ks.vt.as_ptr(),
            tk_pad,
            ds.as_mut_ptr(),
            tk_pad,
            false,
        );
        ds_rows::<Avx512>(
            g, rows, cols, t.lse, t.delta, t.scale, t.bits, t.bias, t.drop, p, pz, ds,
        );
        let pv = if t.drop.is_some() { &*pz } else { &*p };
        bf16dot::round_rows(ds, rows, tk_pad, tk_pad, &mut w.ds16);
        if let (false, Some(bits)) = (t.rows_finite, t.bits) {
            // A non-finite Q or dO value in a row that some keys must not see: `0 · NaN`
            // would reach those keys' gradients, so the visible pairs are summed one by one
            // (on the bf16-rounded P and dS, as the products below take them).
            let round = |x: f32| half::bf16::from_f32(x).to_f32();
            let wide = |x: u16| half::bf16::from_bits(x).to_f32();
            for r in 0..rows {
                for c in (0..cols).filter(|&c| visible(Some(bits), g.words, r, c)) {
                    let (pr, dsr) = (round(pv[r * tk_pad + c]), round(ds[r * tk_pad + c]));
                    for x in 0..g.d {
                        ks.dvt[x * tk_pad + c] += pr * wide(t.dout[r * d_pad + x]);
                        ks.dkt[x * tk_pad + c] += dsr * wide(t.q[r * d_pad + x]);
                    }
                }
            }
        } else {
            bf16dot::interleave_rows(pv, rows, tk_pad, tk_pad, &mut w.pi);
            bf16dot::interleave_rows(ds, rows, tk_pad, tk_pad, &mut w.dsi);
            // dVᵀ += dOᵀ·P ; dKᵀ += Qᵀ·dS (over the query rows, in pairs; padding rows are 0)
            let pairs = rows.div_ceil(2);
            let (qt, doutt) = (t.qt.as_ptr().cast(), t.doutt.as_ptr().cast());
            bf16dot::gemm(
                g.d,
                tk_pad,
                pairs,
                doutt,
                rp,
                w.pi.as_ptr(),
                tk_pad,
                ks.dvt.as_mut_ptr(),
                tk_pad,
                true,
            );
            bf16dot::gemm(
                g.d,
                tk_pad,
                pairs,
                qt,
                rp,
                w.dsi.as_ptr(),
                tk_pad,
                ks.dkt.as_mut_ptr(),
                tk_pad,
                true,
            );
        }
        // dQ += dS·K. As on the f32 path, keys no row of the tile sees are zeroed first
        // (dS = 0 there, and 0 · NaN = NaN); a non-finite key seen by some rows only sends
        // dQ down the per-element path.
        let mut k = &ks.k[..];
        if let (false, Some(bits)) = (ks.k_finite, t.bits) {
            pack::seen_columns(bits, g.words, rows, &mut w.seen);
            ks.k_fix.copy_from_slice(&ks.k);
            pack::zero_unseen_pairs(&mut ks.k_fix, d_pad, cols, &w.seen);
            if !pack::pairs_finite(&ks.k_fix) {
                pack::v_from_pairs(&ks.k_fix, tk_pad, d_pad, &mut ks.k_f32);
                let ds = Strided {
                    ptr: ds.as_ptr(),
                    rs: tk_pad,
                    cs: 1,
                };
                gemm_visible::<Avx512>(
                    (rows, d_pad, cols),
                    ds,
                    (ks.k_f32.as_ptr(), d_pad),
                    (dq.as_mut_ptr(), d_pad),
                    |r, c| visible(t.bits, g.words, r, c),
                );
                return;
            }
            k = &ks.k_fix;
        }
        // Over the keys, in pairs; dS past `cols` is 0, and so are padding keys.
        let ds16 = w.ds16.as_ptr().cast();
        bf16dot::gemm(
            rows,
            d_pad,
            cols.div_ceil(2),
            ds16,
            tk_pad / 2,
            k.as_ptr(),
            d_pad,
            dq.as_mut_ptr(),
            d_pad,
            true,
        );
    }
}
