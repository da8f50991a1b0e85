//! Score modifiers on blocks of a global problem (docs/design.md section 1, "Blocks of a
//! larger problem"): soft-capping, sinks (merged as a part of their own), ALiBi and T5
//! relative positions at the whole problem's `j − i'`, dropout's whole-problem pattern —
//! each block's forward merged and backward summed equals the f64 reference on the whole.

mod common;

use common::blocks::{cuts, doc_ids, Problem, With};
use common::{assert_close, report, Rng, EPS_F32};
use maskattn::{reference, Mask, Params, View};

/// Soft-capping and attention sinks on 3 × 3 blocks: the sink merged once as a part of its
/// own (`O = 0`, `LSE = sink_h`), its gradient from one key block per query block; output,
/// LSE, dq / dk / dv and dsinks equal the reference on the whole problem.
#[test]
fn softcap_and_sinks_work_on_blocks() {
    let mut rng = Rng::new(2203);
    let p = Problem::new(rng.next_u64(), [2, 2, 1, 203, 203, 16]);
    let sinks = [0.7f32, -0.4];
    let par = Params::default().with_softcap(5.0).with_sinks(&sinks);
    let q = View::bhld("q", &p.q, [2, 2, 203, 16]).unwrap();
    let k = View::bhld("k", &p.k, [2, 1, 203, 16]).unwrap();
    let v = View::bhld("v", &p.v, [2, 1, 203, 16]).unwrap();
    let dout = View::bhld("dout", &p.dout, [2, 2, 203, 16]).unwrap();
    let thirds = cuts(203, &[64, 134]);
    let with = With {
        params: Params::default().with_softcap(5.0),
        sinks: Some(&sinks),
        ..With::default()
    };
    for (name, mask) in [
        ("causal", Mask::causal()),
        ("documents", Mask::documents(doc_ids(203), 2)),
        ("query padding", Mask::query_padding(vec![150, 90])),
    ] {
        let gold = reference::forward::<f64>(&q, &k, &v, &mask, &par).unwrap();
        let naive = reference::forward::<f32>(&q, &k, &v, &mask, &par).unwrap();
        let gg = reference::backward::<f64>(&q, &k, &v, &mask, &par, &dout).unwrap();
        let ng = reference::backward::<f32>(&q, &k, &v, &mask, &par, &dout).unwrap();
        let r = p.run_blocked((&p.q, &p.k, &p.v), &mask, &thirds, &thirds, (64, 64), with);
        assert_close(
            &format!("out ({name})"),
            &r.out,
            &gold.out,
            &naive.out,
            EPS_F32,
        );
        assert_close(
            &format!("lse ({name})"),
            &r.lse,
            &gold.lse,
            &naive.lse,
            EPS_F32,
        );
        assert_close(
            &format!("dq ({name})"),
            &r.grads.dq,
            &gg.dq,
            &ng.dq,
            EPS_F32,
        );
        assert_close(
            &format!("dk ({name})"),
            &r.grads.dk,
            &gg.dk,
            &ng.dk,
            EPS_F32,
        );
        assert_close(
            &format!("dv ({name})"),
            &r.grads.dv,
            &gg.dv,
            &ng.dv,
            EPS_F32,
        );
        let (ds, gds, nds) = (
            r.grads.params.dsinks.unwrap(),
            gg.params.dsinks.unwrap(),
            ng.params.dsinks.unwrap(),
        );
        let eps = 1e-5 * gds.iter().fold(1f64, |a, x| a.max(x.abs()));
        assert_close(&format!("dsinks ({name})"), &ds, &gds, &nds, eps);
    }
}

/// ALiBi, T5 relative positions and dropout on blocks: the positional terms take the
/// whole problem's `j − i'` (bottom-right by the global lengths) and dropout the whole
/// problem's pattern, so 3 × 3 blocks of self and cross attention, and the decode path (a
/// query block of 3 rows), equal the reference on the whole problem — dalibi and drel summed
/// over blocks included.
#[test]
fn positional_terms_and_dropout_work_on_blocks() {
    report(&format!(
        "positional_terms_and_dropout_work_on_blocks: ran {}",
        maskattn::kernel_path()
    ));
    let mut rng = Rng::new(2204);
    let slopes = maskattn::alibi_slopes(2);
    let table: Vec<f32> = rng.vec(16 * 2);
    let rel = maskattn::RelBias::new(&table, 16, 60, true).unwrap();
    let dropout = maskattn::Dropout::new(0.2, 99).unwrap();
    for (lq, lk) in [(203, 203), (150, 203)] {
        let p = Problem::new(rng.next_u64(), [2, 2, 1, lq, lk, 16]);
        let q = View::bhld("q", &p.q, [2, 2, lq, 16]).unwrap();
        let k = View::bhld("k", &p.k, [2, 1, lk, 16]).unwrap();
        let v = View::bhld("v", &p.v, [2, 1, lk, 16]).unwrap();
        let dout = View::bhld("dout", &p.dout, [2, 2, lq, 16]).unwrap();
        let thirds = |l: usize| cuts(l, &[l * 64 / 203, l * 134 / 203]);
        let decode_rows = cuts(lq, &[lq - 3]); // the last block has 3 queries: the decode path
        for (name, par) in [
            ("alibi", Params::default().with_alibi(&slopes)),
            ("t5", Params::default().with_rel(rel)),
            ("dropout", Params::default().with_dropout(dropout)),
            (
                "all",
                Params::default()
                    .with_alibi(&slopes)
                    .with_rel(rel)
                    .with_dropout(dropout),
            ),
        ] {
            let mask = Mask::causal() | Mask::prefix(9);
            let gold = reference::forward::<f64>(&q, &k, &v, &mask, &par).unwrap();
            let naive = reference::forward::<f32>(&q, &k, &v, &mask, &par).unwrap();
            let gg = reference::backward::<f64>(&q, &k, &v, &mask, &par, &dout).unwrap();
            let ng = reference::backward::<f32>(&q, &k, &v, &mask, &par, &dout).unwrap();
            for qb in [thirds(lq), decode_rows.clone()] {
                let at = format!("{name}, {lq} x {lk}, query blocks {qb:?}");
                let with = With {
                    params: par,
                    ..With::default()
                };
                let r = p.run_blocked((&p.q, &p.k, &p.v), &mask, &qb, &thirds(lk), (64, 64), with);
                r.assert_matches(&at, (&gold, &naive), (&gg, &ng));
                let g = &r.grads;
                for (what, got, gold, naive) in [
                    (
                        "dalibi",
                        &g.params.dalibi,
                        &gg.params.dalibi,
                        &ng.params.dalibi,
                    ),
                    ("drel", &g.params.drel, &gg.params.drel, &ng.params.drel),
                ] {
                    if let (Some(got), Some(gold), Some(naive)) = (got, gold, naive) {
                        let eps = 1e-5 * gold.iter().fold(1f64, |a, x| a.max(x.abs()));
                        assert_close(&format!("{what} ({at})"), got, gold, naive, eps);
                    }
                }
            }
        }
    }
}
