//! Score-modifier cases: a [`Case`] plus soft-cap, ALiBi, sinks and T5 buckets, checked
//! against the f64 reference for every output and every parameter gradient.

use super::{assert_close, ulp_at_scale, Case, Half, Rng, EPS_F32};
use maskattn::{reference, Params, RelBias, View};

#[derive(Clone, Debug, Default)]
pub struct Mods {
    pub softcap: Option<f32>,
    pub alibi: Option<Vec<f32>>,
    pub sinks: Option<Vec<f32>>,
    /// `(table [num_buckets, H_q], num_buckets, max_distance, bidirectional)`
    pub rel: Option<(Vec<f32>, usize, usize, bool)>,
}

/// Which modifiers a random case draws: bit 0 soft-cap, 1 ALiBi, 2 sinks, 3 T5 buckets.
pub const ALL_MODS: u8 = 0b1111;

impl Mods {
    /// Random modifiers for `heads` query heads, those of `which` (bits as [`ALL_MODS`]).
    pub fn random(rng: &mut Rng, heads: usize, which: u8) -> Mods {
        let configs = [
            (true, 32, 128),
            (false, 32, 128),
            (true, 8, 20),
            (false, 10, 37),
        ];
        let (bidir, nb, md) = configs[rng.below(configs.len())];
        Mods {
            softcap: (which & 1 != 0).then(|| 0.3 + 4.0 * rng.uniform().abs()),
            alibi: (which & 2 != 0).then(|| {
                if rng.below(2) == 0 {
                    maskattn::alibi_slopes(heads)
                } else {
                    (0..heads).map(|_| 0.3 * rng.uniform().abs()).collect()
                }
            }),
            sinks: (which & 4 != 0).then(|| (0..heads).map(|_| 3.0 * rng.uniform()).collect()),
            rel: (which & 8 != 0).then(|| (rng.vec(nb * heads), nb, md, bidir)),
        }
    }

    pub fn names(&self) -> String {
        let mut v = Vec::new();
        if let Some(c) = self.softcap {
            v.push(format!("softcap {c:.2}"));
        }
        if self.alibi.is_some() {
            v.push("alibi".into());
        }
        if self.sinks.is_some() {
            v.push("sinks".into());
        }
        if let Some((_, n, m, b)) = &self.rel {
            v.push(format!("t5({n},{m},{})", if *b { "bi" } else { "uni" }));
        }
        v.join("+")
    }
}

/// A case with score modifiers.
#[derive(Clone)]
pub struct ModCase {
    pub case: Case,
    pub mods: Mods,
}

/// Everything a call returns: out, lse, dq, dk, dv, and the parameter gradients.
pub struct Outputs {
    pub fwd: [Vec<f32>; 2],
    pub grads: maskattn::Grads,
}

impl Outputs {
    /// Every value, in a fixed order, for bitwise comparisons.
    pub fn all(&self) -> Vec<(&'static str, &[f32])> {
        let g = &self.grads;
        let p = &g.params;
        let mut v: Vec<(&'static str, &[f32])> = vec![
            ("out", &self.fwd[0]),
            ("lse", &self.fwd[1]),
            ("dq", &g.dq),
            ("dk", &g.dk),
            ("dv", &g.dv),
        ];
        for (n, x) in [
            ("dbias", &p.dbias),
            ("dalibi", &p.dalibi),
            ("dsinks", &p.dsinks),
            ("drel", &p.drel),
        ] {
            if let Some(x) = x {
                v.push((n, x));
            }
        }
        v
    }

    /// Bitwise equality of every value (NaN equal to the same NaN).
    pub fn assert_bits_eq(&self, other: &Outputs, what: &str) {
        for ((n, a), (_, b)) in self.all().into_iter().zip(other.all()) {
            assert_eq!(a.len(), b.len(), "{what}: {n} lengths");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "{what}: {n}[{i}] {x} vs {y}");
            }
        }
    }
}

impl ModCase {
    pub fn random(
        seed: u64,
        dims: [usize; 6],
        tiles: (usize, usize),
        bias: bool,
        which: u8,
    ) -> Self {
        let case = super::random_case(seed, dims, tiles, bias);
        let mut rng = Rng::new(seed ^ 0x5EED);
        let mods = Mods::random(&mut rng, dims[1], which);
        ModCase { case, mods }
    }

    pub fn params(&self) -> Params<'_> {
        let mut p = self.case.params();
        p.softcap = self.mods.softcap;
        p.alibi = self.mods.alibi.as_deref();
        p.sinks = self.mods.sinks.as_deref();
        p.rel = self
            .mods
            .rel
            .as_ref()
            .map(|(t, n, m, b)| RelBias::new(t, *n, *m, *b).unwrap());
        p
    }

    /// Forward and backward on f32 storage.
    pub fn run(&self) -> Outputs {
        let c = &self.case;
        let (q, k, v) = c.views();
        self.run_on(&q, &k, &v)
    }

    pub fn run_on<T: maskattn::Element>(&self, q: &View<T>, k: &View<T>, v: &View<T>) -> Outputs {
        let c = &self.case;
        let block = c.block();
        let p = self.params();
        let fwd = maskattn::forward(q, k, v, &block, &p).unwrap();
        let out = View::bhld("out", &fwd.out, c.q_shape()).unwrap();
        let grads = maskattn::backward(
            &maskattn::Qkv::new(q, k, v),
            &out,
            &fwd.lse,
            &c.dout_view(),
            &block,
            &p,
        )
        .unwrap();
        Outputs {
            fwd: [fwd.out, fwd.lse],
            grads,
        }
    }

    /// Every output and parameter gradient against the f64 reference under the accuracy
    /// rule (naive = the f32 reference).
    pub fn check(&self) {
        let got = self.run();
        let c = &self.case;
        let (q, k, v) = c.views();
        let p = self.params();
        let gold = reference::forward::<f64>(&q, &k, &v, &c.mask, &p).unwrap();
        let naive = reference::forward::<f32>(&q, &k, &v, &c.mask, &p).unwrap();
        let dout = c.dout_view();
        let gg = reference::backward::<f64>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
        let ng = reference::backward::<f32>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
        let f = |x: &[f32]| x.to_vec();
        self.compare(
            &got,
            (&gold.out, &gold.lse),
            (&naive.out, &naive.lse),
            &gg,
            &ng,
            f,
            |_| EPS_F32,
        );
    }

    /// The same on `H` storage (the case's inputs rounded to `H` first, as
    /// [`Case::check_half`] does): forward naive = f32 reference, gradients naive = the
    /// reference in `H`, `ε` one ulp of `H` at each result's scale.
    pub fn check_half<H: Half>(&self) {
        let me = ModCase {
            case: self.case.rounded::<H>(),
            mods: self.mods.clone(),
        };
        let c = &me.case;
        let conv = |x: &Vec<f32>| {
            x.iter()
                .map(|&v| H::from_f32_rounded(v))
                .collect::<Vec<H>>()
        };
        let (qh, kh, vh) = (conv(&c.q), conv(&c.k), conv(&c.v));
        fn hv<'a, H: Half>(
            n: &'static str,
            d: &'a [H],
            s: [usize; 4],
            l: super::Layout,
        ) -> View<'a, H> {
            match l {
                super::Layout::Bhld => View::bhld(n, d, s).unwrap(),
                super::Layout::Blhd => View::blhd(n, d, s).unwrap(),
            }
        }
        let got = me.run_on(
            &hv("q", &qh, c.q_shape(), c.layouts[0]),
            &hv("k", &kh, c.kv_shape(), c.layouts[1]),
            &hv("v", &vh, c.kv_shape(), c.layouts[2]),
        );
        let (q, k, v) = c.views();
        let p = me.params();
        let gold = reference::forward::<f64>(&q, &k, &v, &c.mask, &p).unwrap();
        let naive = reference::forward::<f32>(&q, &k, &v, &c.mask, &p).unwrap();
        let dout = c.dout_view();
        let gg = reference::backward::<f64>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
        let ng = reference::backward::<H>(&q, &k, &v, &c.mask, &p, &dout).unwrap();
        let f = |x: &[H]| {
            x.iter()
                .map(|&v| maskattn::Element::to_f32(v))
                .collect::<Vec<f32>>()
        };
        me.compare(
            &got,
            (&gold.out, &gold.lse),
            (&naive.out, &naive.lse),
            &gg,
            &ng,
            f,
            |g| ulp_at_scale::<H>(g).max(EPS_F32),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn compare<N: Copy>(
        &self,
        got: &Outputs,
        gold: (&[f64], &[f64]),
        naive: (&[f32], &[f32]),
        gg: &reference::RefGrads<f64>,
        ng: &reference::RefGrads<N>,
        f: impl Fn(&[N]) -> Vec<f32>,
        eps: impl Fn(&[f64]) -> f64,
    ) {
        let e32 = |g: &[f64]| eps(g).max(EPS_F32);
        assert_close("out", &got.fwd[0], gold.0, naive.0, e32(gold.0));
        assert_close("lse", &got.fwd[1], gold.1, naive.1, e32(gold.1));
        let g = &got.grads;
        assert_close("dq", &g.dq, &gg.dq, &f(&ng.dq), eps(&gg.dq));
        assert_close("dk", &g.dk, &gg.dk, &f(&ng.dk), eps(&gg.dk));
        assert_close("dv", &g.dv, &gg.dv, &f(&ng.dv), eps(&gg.dv));
        let (kp, gp, np) = (&g.params, &gg.params, &ng.params);
        let mg = &gg.magnitudes;
        let d = self.case.q_shape()[3] as f64;
        for (name, k, gd, nv, mag) in [
            ("dbias", &kp.dbias, &gp.dbias, &np.dbias, &mg.dbias),
            ("dalibi", &kp.dalibi, &gp.dalibi, &np.dalibi, &mg.dalibi),
            ("dsinks", &kp.dsinks, &gp.dsinks, &np.dsinks, &mg.dsinks),
            ("drel", &kp.drel, &gp.drel, &np.drel, &mg.drel),
        ] {
            assert_eq!(
                k.is_some(),
                gd.is_some(),
                "{name}: present in the kernel's result exactly when in the reference's"
            );
            if let (Some(k), Some(gd), Some(nv)) = (k, gd, nv) {
                // ε at the gradient's scale: these sum over every pair of the call (dslope
                // weighs each by a distance up to L_k), so their rounding grows with their
                // size, and the naive sum's error depends on the luck of its cancellations
                // (seen: a slope gradient of 60.4 where naive f32 erred 7.8e-6 and the
                // kernel 9.5e-5, 1.6e-6 relative; other cases have naive at 1.3e-4).
                let scale = gd
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(1f64, |a, x| a.max(x.abs()));
                // And where the terms cancel, the rounding of the terms themselves: a
                // gradient whose true value is ~0 is a sum of f32 rounding noise, and the
                // naive sum's luck is no measure (seen: one key per row under dropout, the
                // slope gradient's terms summing to 1.2e-3 in absolute value, naive 8.0e-6
                // from 0 and the kernel 2.5e-4 = 0.3 u Σ|terms|, u = 2⁻²⁴; each term's own
                // rounding was ~1.5 u |term| at d = 59, and grows as √d). Bound:
                // u √d Σ|terms| / 4, of the largest entry's terms.
                let noise = mag.as_ref().map_or(0.0, |m| {
                    let top = m
                        .iter()
                        .filter(|x| x.is_finite())
                        .fold(0f64, |a, x| a.max(*x));
                    d.sqrt() * f64::from(f32::EPSILON) / 2.0 * top / 4.0
                });
                assert_close(name, k, gd, &f(nv), eps(gd).max(EPS_F32 * scale).max(noise));
            }
        }
    }
}
