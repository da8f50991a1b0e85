//! Score modifiers (soft-cap, ALiBi, sinks, T5 relative positions, with and without a
//! learned bias) against the f64 reference: every output and every parameter gradient,
//! alone and combined, with random masks, GQA, L_q ≠ L_k, bf16, the decode path; the
//! reference's own parameter gradients against finite differences; rows that see nothing
//! with sinks; hidden NaN; thread-count determinism; bad input. (Every instruction set:
//! `score_mods_every_isa.rs`, a process of its own.)

#![allow(clippy::needless_range_loop)] // index loops over (b, h, i) read clearer here

mod common;

use common::mods::{ModCase, Mods, ALL_MODS};
use common::{random_case, report, Rng};
use maskattn::half::bf16;
use maskattn::{reference, AttnError, BlockMask, Mask, MaskShape, Params, RelBias, View};
use proptest::prelude::*;

fn lengths() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(113), Just(64), 1usize..90]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Random modifiers (each on or off), random masks, shapes and tiles.
    #[test]
    fn random_modifiers_follow_the_accuracy_rule(
        seed in any::<u64>(),
        b in 1usize..3,
        hkv in 1usize..3,
        group in 1usize..3,
        lq in lengths(),
        lk in lengths(),
        d in prop_oneof![Just(16usize), Just(59), 1usize..40],
        tiles in common::tiles(),
        which in 1u8..16,
        bias in any::<bool>(),
    ) {
        let c = ModCase::random(seed, [b, hkv * group, hkv, lq, lk, d], tiles, bias, which);
        c.check();
    }
}

#[test]
fn each_modifier_alone_and_all_together() {
    report(&format!("score_mods: ran {}", maskattn::kernel_path()));
    let mut rng = Rng::new(3);
    for which in [1u8, 2, 4, 8, ALL_MODS] {
        for bias in [false, true] {
            for n in 0..4u64 {
                let dims = [2, 4, 2, 40 + rng.below(90), 30 + rng.below(120), 32];
                let mut c = ModCase::random(n * 17 + which as u64, dims, (32, 48), bias, which);
                c.case.mask = match n {
                    0 => Mask::causal(),
                    1 => Mask::window(20, 3),
                    2 => Mask::documents_cross(
                        (0..dims[0] * dims[3])
                            .map(|i| (i % dims[3] / 25) as i64)
                            .collect::<Vec<_>>(),
                        (0..dims[0] * dims[4])
                            .map(|j| (j % dims[4] / 25) as i64)
                            .collect::<Vec<_>>(),
                        dims[0],
                    ),
                    _ => Mask::key_padding(vec![dims[4], dims[4] / 2]) & Mask::causal(),
                };
                c.check();
            }
        }
    }
}

#[test]
fn bf16_storage_with_modifiers() {
    common::report_bf16_path("score_mods::bf16_storage_with_modifiers");
    let mut rng = Rng::new(11);
    for n in 0..12u64 {
        let hkv = 1 + rng.below(2);
        let dims = [
            1 + rng.below(2),
            hkv * (1 + rng.below(2)),
            hkv,
            1 + rng.below(130),
            1 + rng.below(130),
            [16, 32, 59][rng.below(3)],
        ];
        let c = ModCase::random(
            n * 7 + 1,
            dims,
            [(64, 64), (16, 32), (32, 100)][rng.below(3)],
            n % 2 == 0,
            (n % 15 + 1) as u8,
        );
        c.check_half::<bf16>();
    }
}

#[test]
fn decode_path_with_modifiers() {
    // L_q ≤ 4: the split-KV path, merged by LSE (the sink counted once).
    let mut rng = Rng::new(5);
    for n in 0..16u64 {
        let hkv = 1 + rng.below(2);
        let dims = [
            1 + rng.below(2),
            hkv * (1 + rng.below(4)),
            hkv,
            1 + rng.below(4),
            200 + rng.below(900),
            [16, 32, 48][rng.below(3)],
        ];
        let which = [ALL_MODS, 4, 2 | 4, 1 | 8][n as usize % 4];
        let mut c = ModCase::random(n * 13 + 2, dims, (64, 64), n % 3 == 0, which);
        if n % 2 == 0 {
            c.case.mask = Mask::causal() & Mask::key_padding(vec![dims[4] / 2 + 1; dims[0]]);
        }
        c.check();
        if n < 4 {
            c.check_half::<bf16>();
        }
    }
    report("score_mods: decode path (L_q ≤ 4, keys split across tasks) checked");
}

/// `Σ out · dout` of the f64 reference, the loss whose gradient the backward computes.
fn loss(c: &ModCase, p: &Params) -> f64 {
    let (q, k, v) = c.case.views();
    let f = reference::forward::<f64>(&q, &k, &v, &c.case.mask, p).unwrap();
    f.out
        .iter()
        .zip(&c.case.dout)
        .map(|(o, g)| o * *g as f64)
        .sum()
}

/// Central differences of the loss in one parameter value against the reference's gradient.
fn fd_check(name: &str, analytic: f64, mut at: impl FnMut(f32) -> f64, x: f32) {
    let h = 1e-3f32;
    let num = (at(x + h) - at(x - h)) / (2.0 * h as f64);
    let tol = 2e-3 * (1.0 + num.abs());
    assert!(
        (num - analytic).abs() <= tol,
        "{name}: finite difference {num}, reference gradient {analytic}"
    );
}

#[test]
fn reference_parameter_gradients_match_finite_differences() {
    let mut checked = 0;
    for seed in 0..4u64 {
        let dims = [2, 2, 1, 5, 7, 4];
        let mut c = ModCase::random(seed, dims, (4, 4), true, ALL_MODS);
        c.case.dropout = None;
        // q's buffer in the layout of dq, so that index `at` is the same value in both.
        c.case.layouts = [common::Layout::Bhld; 3];
        c.case.mask = if seed % 2 == 0 {
            Mask::causal()
        } else {
            Mask::window(2, 1)
        };
        // T5 with few exact buckets, so that the log branch and both directions occur.
        c.mods.rel = Some((Rng::new(seed).vec(8 * 2), 8, 5, seed % 2 == 0));
        let (q, k, v) = c.case.views();
        let p = c.params();
        let g =
            reference::backward::<f64>(&q, &k, &v, &c.case.mask, &p, &c.case.dout_view()).unwrap();
        let pg = &g.params;
        for h in 0..2 {
            let mut s = c.mods.sinks.clone().unwrap();
            fd_check(
                "dsinks",
                pg.dsinks.as_ref().unwrap()[h],
                |x| {
                    s[h] = x;
                    let mut m = c.clone();
                    m.mods.sinks = Some(s.clone());
                    loss(&m, &m.params())
                },
                c.mods.sinks.as_ref().unwrap()[h],
            );
            let mut a = c.mods.alibi.clone().unwrap();
            fd_check(
                "dalibi",
                pg.dalibi.as_ref().unwrap()[h],
                |x| {
                    a[h] = x;
                    let mut m = c.clone();
                    m.mods.alibi = Some(a.clone());
                    loss(&m, &m.params())
                },
                c.mods.alibi.as_ref().unwrap()[h],
            );
            checked += 2;
        }
        let (table, nb, _, _) = c.mods.rel.clone().unwrap();
        for at in 0..nb * 2 {
            let mut t = table.clone();
            fd_check(
                "drel",
                pg.drel.as_ref().unwrap()[at],
                |x| {
                    t[at] = x;
                    let mut m = c.clone();
                    m.mods.rel.as_mut().unwrap().0 = t.clone();
                    loss(&m, &m.params())
                },
                table[at],
            );
            checked += 1;
        }
        let (bias, _) = c.case.bias.clone().unwrap();
        for at in (0..bias.len()).step_by(3) {
            let mut bv = bias.clone();
            fd_check(
                "dbias",
                pg.dbias.as_ref().unwrap()[at],
                |x| {
                    bv[at] = x;
                    let mut m = c.clone();
                    m.case.bias.as_mut().unwrap().0 = bv.clone();
                    loss(&m, &m.params())
                },
                bias[at],
            );
            checked += 1;
        }
        // Through the soft-cap: dq against the loss's change in q.
        for at in (0..c.case.q.len()).step_by(5) {
            let mut qv = c.case.q.clone();
            fd_check(
                "dq through the cap",
                g.dq[at],
                |x| {
                    qv[at] = x;
                    let mut m = c.clone();
                    m.case.q = qv.clone();
                    loss(&m, &m.params())
                },
                c.case.q[at],
            );
            checked += 1;
        }
    }
    report(&format!(
        "score_mods: {checked} finite-difference checks of the reference"
    ));
}

#[test]
fn rows_that_see_nothing_with_sinks() {
    // Batch row 1 sees no key at all; in batch row 0 the first queries see nothing
    // (query-aligned window on the other side).
    let dims = [2, 4, 2, 70, 90, 16];
    let mut c = ModCase::random(9, dims, (16, 32), true, ALL_MODS);
    c.case.dropout = None;
    c.case.mask =
        Mask::key_padding(vec![90, 0]) & Mask::causal() & !Mask::query_padding(vec![5, 0]);
    // A NaN dO on rows that see nothing must not reach any gradient.
    let lq = dims[3];
    for h in 0..dims[1] {
        for x in 0..dims[5] {
            c.case.dout[((h) * lq + 2) * dims[5] + x] = f32::NAN; // b 0, i 2: empty
            c.case.dout[(((dims[1] + h) * lq) + 7) * dims[5] + x] = f32::NAN; // b 1: empty
        }
    }
    let got = c.run();
    let sinks = c.mods.sinks.clone().unwrap();
    let d = dims[5];
    let mut empty = 0;
    for b in 0..2 {
        for h in 0..dims[1] {
            for i in 0..lq {
                if !(b == 1 || i < 5) {
                    continue;
                }
                let row = (b * dims[1] + h) * lq + i;
                assert_eq!(
                    got.fwd[1][row].to_bits(),
                    sinks[h].to_bits(),
                    "LSE of an empty row is the sink"
                );
                assert!(got.fwd[0][row * d..(row + 1) * d].iter().all(|&o| o == 0.0));
                assert!(got.grads.dq[row * d..(row + 1) * d]
                    .iter()
                    .all(|&g| g == 0.0));
                empty += 1;
            }
        }
    }
    // Batch row 1's keys are seen by nobody: zero gradients.
    let kv = dims[2] * dims[4] * d;
    assert!(got.grads.dk[kv..]
        .iter()
        .chain(&got.grads.dv[kv..])
        .all(|&g| g == 0.0));
    for (n, x) in got.all() {
        if n != "lse" && n != "out" {
            assert!(
                x.iter().all(|v| v.is_finite()),
                "{n} has a non-finite value"
            );
        }
    }
    // And the whole result follows the rule (the reference skips those rows likewise).
    c.check();
    report(&format!(
        "score_mods: {empty} empty rows with sinks: O = 0, LSE = sink, zero gradients"
    ));
}

#[test]
fn hidden_nan_changes_nothing_with_modifiers() {
    for (n, which) in [ALL_MODS, 1, 2 | 8, 4].into_iter().enumerate() {
        let dims = [2, 4, 2, 60 + n, 100, 24];
        let mut c = ModCase::random(n as u64 + 40, dims, (16, 32), true, which);
        let lens = vec![70usize, 45];
        c.case.mask = Mask::key_padding(lens.clone()) & Mask::causal();
        let clean = c.run();
        let mut poisoned = c.clone();
        let [b, _, hkv, _, lk, d] = dims;
        for bi in 0..b {
            for h in 0..hkv {
                for j in lens[bi]..lk {
                    for x in 0..d {
                        let at = match c.case.layouts[1] {
                            common::Layout::Bhld => ((bi * hkv + h) * lk + j) * d + x,
                            common::Layout::Blhd => ((bi * lk + j) * hkv + h) * d + x,
                        };
                        poisoned.case.k[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][x % 3];
                        let at = match c.case.layouts[2] {
                            common::Layout::Bhld => ((bi * hkv + h) * lk + j) * d + x,
                            common::Layout::Blhd => ((bi * lk + j) * hkv + h) * d + x,
                        };
                        poisoned.case.v[at] = f32::NAN;
                    }
                }
            }
        }
        poisoned
            .run()
            .assert_bits_eq(&clean, &format!("hidden NaN, {}", c.mods.names()));
    }
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn parameter_gradients_do_not_depend_on_threads() {
    for (n, (dims, bias_dims)) in [
        ([2, 4, 2, 150, 170, 32], [1, 4, 150, 170]),
        ([1, 8, 2, 200, 200, 16], [1, 1, 1, 200]),
        ([2, 2, 1, 2, 700, 32], [2, 1, 1, 700]),
        // Many key tiles: the number of tasks could vary with threads if it were allowed to.
        ([1, 2, 1, 64, 2000, 16], [1, 2, 64, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = ModCase::random(n as u64 + 90, dims, (32, 48), false, ALL_MODS);
        c.case.mask = Mask::causal();
        let mut rng = Rng::new(n as u64);
        c.case.bias = Some((rng.vec(bias_dims.iter().product()), bias_dims));
        let one = in_pool(1, || c.run());
        let two = in_pool(2, || c.run());
        let five = in_pool(5, || c.run());
        one.assert_bits_eq(&two, "1 vs 2 threads");
        one.assert_bits_eq(&five, "1 vs 5 threads");
        assert!(one.grads.params.dbias.is_some() && one.grads.params.drel.is_some());
    }
}

#[test]
fn backward_into_takes_only_the_gradients_asked_for() {
    let dims = [1, 2, 1, 30, 40, 8];
    let c = ModCase::random(4, dims, (16, 16), true, ALL_MODS);
    let full = c.run();
    let (q, k, v) = c.case.views();
    let block = c.case.block();
    let p = c.params();
    let out = View::bhld("out", &full.fwd[0], c.case.q_shape()).unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; full.grads.dq.len()],
        vec![0f32; full.grads.dk.len()],
        vec![0f32; full.grads.dv.len()],
    );
    let mut dalibi = vec![f32::NAN; 2];
    let mut grads = maskattn::GradsMut::new(&mut dq, &mut dk, &mut dv);
    grads.params.dalibi = Some(&mut dalibi);
    maskattn::backward_into(
        &maskattn::Qkv::new(&q, &k, &v),
        &out,
        &full.fwd[1],
        &c.case.dout_view(),
        &block,
        &p,
        grads,
    )
    .unwrap();
    assert_eq!(&dalibi, full.grads.params.dalibi.as_ref().unwrap());
    assert_eq!(dq, full.grads.dq);
    // Wrong length, and a buffer for a modifier the call lacks.
    let mut bad = vec![0f32; 3];
    let mut grads = maskattn::GradsMut::new(&mut dq, &mut dk, &mut dv);
    grads.params.dsinks = Some(&mut bad);
    let e = maskattn::backward_into(
        &maskattn::Qkv::new(&q, &k, &v),
        &out,
        &full.fwd[1],
        &c.case.dout_view(),
        &block,
        &p,
        grads,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("dsinks") && e.to_string().contains("needs 2"),
        "{e}"
    );
    let plain = c.case.params();
    let mut grads = maskattn::GradsMut::new(&mut dq, &mut dk, &mut dv);
    grads.params.drel = Some(&mut bad);
    let e = maskattn::backward_into(
        &maskattn::Qkv::new(&q, &k, &v),
        &out,
        &full.fwd[1],
        &c.case.dout_view(),
        &block,
        &plain,
        grads,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no such modifier"), "{e}");
}

#[test]
fn bad_modifiers_are_typed_errors() {
    let c = random_case(1, [1, 2, 1, 8, 8, 4], (4, 4), false);
    let (q, k, v) = c.views();
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(1, 2, 8, 8)).unwrap();
    let run = |p: &Params| maskattn::forward(&q, &k, &v, &block, p).map(|_| ());
    for cap in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = run(&Params::default().with_softcap(cap)).unwrap_err();
        assert!(matches!(e, AttnError::BadSoftcap(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("soft-cap must be positive and finite"),
            "{e}"
        );
    }
    let e = run(&Params::default().with_alibi(&[0.5])).unwrap_err();
    assert!(e.to_string().contains("alibi slopes hold 1 values"), "{e}");
    let e = run(&Params::default().with_sinks(&[0.5, f32::NAN])).unwrap_err();
    assert!(e.to_string().contains("sinks must be finite"), "{e}");
    let t = vec![0f32; 32 * 3];
    let e = run(&Params::default().with_rel(RelBias::new(&t, 32, 128, true).unwrap())).unwrap_err();
    assert!(e.to_string().contains("H_q = 2"), "{e}");
    let _ = Mods::default();
}

#[test]
fn bias_gradient_in_every_broadcast_form() {
    let dims = [2, 4, 2, 37, 75, 16];
    let [b, h, _, lq, lk, _] = dims;
    let mut n = 0;
    for db in [1, b] {
        for dh in [1, h] {
            for dq in [1, lq] {
                for dk in [1, lk] {
                    let which = [0u8, ALL_MODS, 2, 1][n % 4];
                    let mut c = ModCase::random(n as u64 + 300, dims, (16, 32), false, which);
                    if which == 0 {
                        c.mods = Mods::default();
                    }
                    c.case.mask = Mask::causal() & Mask::key_padding(vec![lk, 50]);
                    let bd = [db, dh, dq, dk];
                    c.case.bias = Some((Rng::new(n as u64).vec(bd.iter().product()), bd));
                    c.check();
                    n += 1;
                }
            }
        }
    }
    report(&format!(
        "score_mods: dbias checked in all {n} broadcast forms"
    ));
}
