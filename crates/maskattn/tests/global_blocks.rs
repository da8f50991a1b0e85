//! Blocks of a global problem (the kernel's side of context parallelism, docs/design.md
//! section 1, "Blocks of a larger problem"): every mask kind evaluated at global positions
//! through `BlockMask::new_block`, each block's forward merged over key blocks with
//! `merge_partials`, each block's backward from the merged output and LSE (and a `dLSE`),
//! against the f64 reference on the whole sequence with the accuracy rule of section 4.

mod common;

use std::ops::Range;

use common::blocks::{cuts, doc_ids, lse_loss_grads, Problem, With};
use common::{assert_close, grid_of, random_dense, report, Rng, EPS_F32};
use maskattn::{reference, AttnError, BlockMask, Mask, MaskShape, Params, Qkv, Upstream, View};

/// Every mask kind, with data for the whole problem `s` (B = 2): each is evaluated at
/// global positions by the blocks.
fn masks(s: MaskShape, rng: &mut Rng) -> Vec<(&'static str, Mask)> {
    let (lq, lk) = (s.lq, s.lk);
    let (gh, gw) = grid_of(lk);
    let docs = Mask::documents_cross(doc_ids(lq), doc_ids(lk), 2);
    let keep: Vec<bool> = (0..2 * lk).map(|_| rng.below(5) != 0).collect();
    vec![
        ("full", Mask::full()),
        ("causal", Mask::causal()),
        ("causal top-left", Mask::causal_top_left()),
        ("window(17,5)", Mask::window(17, 5)),
        ("chunks(48)", Mask::chunks(48)),
        ("block-causal(33)", Mask::block_causal(33)),
        ("neighbourhood", Mask::neighbourhood(gh, gw, 2)),
        ("natten", Mask::natten(gh, gw, 3)),
        ("natten dilated", Mask::natten_dilated(gh, gw, 3, 2)),
        ("chunked(16,2)", Mask::chunked(16, Some(2))),
        ("chunked(16)", Mask::chunked(16, None)),
        ("prefix(23)", Mask::prefix(23)),
        ("prefix per batch", Mask::prefix_per_batch(vec![10, 90])),
        ("key padding", Mask::key_padding(vec![lk - 37, lk])),
        ("key keep", Mask::key_keep(keep, 2)),
        // Rows past the length see nothing in any key block.
        ("query padding", Mask::query_padding(vec![lq - 20, lq / 2])),
        ("documents", docs.clone()),
        ("causal & documents", Mask::causal() & docs),
        ("dense", Mask::dense(random_dense(rng, &s))),
        (
            "from_fn",
            Mask::from_fn(|b, h, i, j| (i / 50 + j / 40 + b + h) % 3 != 1 && j <= i + 60),
        ),
        ("from_fn_ij", Mask::from_fn_ij(|i, j| (i + 2 * j) % 5 != 1)),
        (
            "per head",
            Mask::per_head(vec![Mask::window(9, 9), Mask::causal() | Mask::prefix(5)]),
        ),
        ("not causal", !Mask::causal()),
    ]
}

/// How the whole problem is cut: query blocks, key blocks, tile sizes.
type Cut = (Vec<Range<usize>>, Vec<Range<usize>>, (usize, usize));

/// Grids of 1 × 2, 1 × 3 (key splits only), 2 × 2 and 3 × 3 blocks, uneven and unaligned
/// (203 = 64 + 70 + 69), with the kernels' 64 × 64 tiles and with small tiles that put
/// several partial tiles in a block.
fn grids(lq: usize, lk: usize, rng: &mut Rng) -> Vec<Cut> {
    let one: Vec<Range<usize>> = std::iter::once(0..lq).collect();
    let split = 1 + rng.below(lk - 1);
    let thirds = |l: usize| cuts(l, &[l * 64 / 203, l * 134 / 203]);
    vec![
        (one.clone(), cuts(lk, &[split]), (64, 64)),
        (one, cuts(lk, &[lk / 4, lk / 2 + 3]), (16, 24)),
        (cuts(lq, &[lq / 2 - 5]), cuts(lk, &[lk / 2 - 5]), (64, 64)),
        (thirds(lq), thirds(lk), (64, 64)),
        (thirds(lq), cuts(lk, &[lk / 5, lk / 3 + 7]), (16, 24)),
    ]
}

/// Block pairs whose every pair (b, h, i, j) the mask hides, counted pair by pair.
fn hidden_blocks(mask: &Mask, s: MaskShape, qb: &[Range<usize>], kb: &[Range<usize>]) -> usize {
    let hidden = |qr: &Range<usize>, kr: &Range<usize>| {
        (0..s.batch).all(|b| {
            (0..s.heads).all(|h| {
                qr.clone()
                    .all(|i| kr.clone().all(|j| !mask.allowed(&s, b, h, i, j)))
            })
        })
    };
    qb.iter()
        .map(|qr| kb.iter().filter(|kr| hidden(qr, kr)).count())
        .sum()
}

/// Self-attention (203 × 203) and cross attention (150 × 203, bottom-right alignment by
/// the global lengths): every mask kind on every grid, forward merged and backward summed,
/// equals the reference on the whole problem; hidden block pairs are skipped, and counted.
#[test]
fn blocks_of_every_mask_kind_equal_the_whole_problem() {
    report(&format!(
        "blocks_of_every_mask_kind_equal_the_whole_problem: ran {}",
        maskattn::kernel_path()
    ));
    let mut rng = Rng::new(22);
    let (mut skipped_all, mut blocks_all) = (0, 0);
    for (lq, lk) in [(203, 203), (150, 203)] {
        let p = Problem::new(rng.next_u64(), [2, 2, 1, lq, lk, 16]);
        let s = p.shape();
        let q = View::bhld("q", &p.q, [2, 2, lq, 16]).unwrap();
        let k = View::bhld("k", &p.k, [2, 1, lk, 16]).unwrap();
        let v = View::bhld("v", &p.v, [2, 1, lk, 16]).unwrap();
        let dout = View::bhld("dout", &p.dout, [2, 2, lq, 16]).unwrap();
        let grids = grids(lq, lk, &mut rng);
        for (name, mask) in masks(s, &mut rng) {
            let par = Params::default();
            let gold = reference::forward::<f64>(&q, &k, &v, &mask, &par).unwrap();
            let naive = reference::forward::<f32>(&q, &k, &v, &mask, &par).unwrap();
            let gg = reference::backward::<f64>(&q, &k, &v, &mask, &par, &dout).unwrap();
            let ng = reference::backward::<f32>(&q, &k, &v, &mask, &par, &dout).unwrap();
            for (qb, kb, tiles) in &grids {
                let at = format!("{name}, {lq} x {lk}, blocks {qb:?} x {kb:?}, tiles {tiles:?}");
                let r = p.run_blocked((&p.q, &p.k, &p.v), &mask, qb, kb, *tiles, With::default());
                r.assert_matches(&at, (&gold, &naive), (&gg, &ng));
                let hidden = hidden_blocks(&mask, s, qb, kb);
                assert_eq!(r.skipped, hidden, "blocks skipped ({at})");
                skipped_all += r.skipped;
                blocks_all += qb.len() * kb.len();
            }
        }
    }
    report(&format!(
        "blocks_of_every_mask_kind_equal_the_whole_problem: {skipped_all} of {blocks_all} \
         block pairs skipped as all-empty"
    ));
    assert!(skipped_all > 0, "some mask must hide whole blocks");
}

/// The backward of each block from the merged output and LSE with a `dLSE` equals the f64
/// gradient of `Σ dO ∘ O + Σ dLSE ∘ LSE` on the whole problem; and the whole problem's
/// `backward_upstream` too. The loss's reference is checked against `reference::backward`
/// with `dLSE = 0` first.
#[test]
fn backward_with_dlse_is_the_gradient_of_a_loss_using_the_lse() {
    report(&format!(
        "backward_with_dlse_is_the_gradient_of_a_loss_using_the_lse: ran {}",
        maskattn::kernel_path()
    ));
    let mut rng = Rng::new(2201);
    let p = Problem::new(rng.next_u64(), [2, 2, 1, 203, 203, 16]);
    let s = p.shape();
    let mut no_dlse = Problem::new(7, [2, 2, 1, 203, 203, 16]);
    no_dlse.dlse.fill(0.0);
    fn views(p: &Problem) -> [View<'_>; 4] {
        let v = |n, x, h, l| View::bhld(n, x, [2, h, l, 16]).unwrap();
        [
            v("q", &p.q, 2, 203),
            v("k", &p.k, 1, 203),
            v("v", &p.v, 1, 203),
            v("dout", &p.dout, 2, 203),
        ]
    }
    let [q, k, v, dout] = views(&no_dlse);
    let gg =
        reference::backward::<f64>(&q, &k, &v, &Mask::causal(), &Params::default(), &dout).unwrap();
    let [dq, _, dv] = lse_loss_grads::<f64>(&no_dlse, &Mask::causal());
    let gap = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(gap(&dq, &gg.dq) < 1e-12 && gap(&dv, &gg.dv) < 1e-12);

    let [q, k, v, dout] = views(&p);
    for (name, mask) in masks(s, &mut rng) {
        let gold = lse_loss_grads::<f64>(&p, &mask);
        let naive = lse_loss_grads::<f32>(&p, &mask);
        let check = |what: &str, got: [&[f32]; 3]| {
            for ((x, g), (gd, nv)) in ["dq", "dk", "dv"]
                .iter()
                .zip(got)
                .zip(gold.iter().zip(&naive))
            {
                assert_close(&format!("{x} ({name}, {what})"), g, gd, nv, EPS_F32);
            }
        };
        // The whole problem, dLSE through `backward_upstream`.
        let block = BlockMask::new(&mask, s).unwrap();
        let f = maskattn::forward(&q, &k, &v, &block, &Params::default()).unwrap();
        let out = View::bhld("out", &f.out, [2, 2, 203, 16]).unwrap();
        let up = Upstream::new(&dout).with_dlse(&p.dlse);
        let g = maskattn::backward_upstream(
            &Qkv::new(&q, &k, &v),
            &out,
            &f.lse,
            up,
            &block,
            &Params::default(),
        )
        .unwrap();
        check("whole", [&g.dq, &g.dk, &g.dv]);
        // 3 x 3 blocks, 64 / 70 / 69.
        let thirds = cuts(203, &[64, 134]);
        let r = p.run_blocked(
            (&p.q, &p.k, &p.v),
            &mask,
            &thirds,
            &thirds,
            (64, 64),
            With {
                dlse: true,
                ..With::default()
            },
        );
        check("3 x 3 blocks", [&r.grads.dq, &r.grads.dk, &r.grads.dv]);
    }
}

/// bf16 storage: blocks read the bf16 inputs in place; merged output, LSE and summed
/// gradients equal the whole problem's kernel results on the same bf16 inputs within one
/// bf16 ulp at the results' scale (the whole problem's own accuracy is what
/// kernels_vs_reference checks).
#[test]
fn bf16_blocks_equal_the_whole_bf16_problem() {
    use maskattn::half::bf16;
    common::report_bf16_path("bf16_blocks_equal_the_whole_bf16_problem");
    let mut rng = Rng::new(2202);
    let p = Problem::new(rng.next_u64(), [2, 2, 1, 203, 203, 16]);
    let h = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let (qh, kh, vh) = (h(&p.q), h(&p.k), h(&p.v));
    let (q, k, v) = (
        View::bhld("q", &qh, [2, 2, 203, 16]).unwrap(),
        View::bhld("k", &kh, [2, 1, 203, 16]).unwrap(),
        View::bhld("v", &vh, [2, 1, 203, 16]).unwrap(),
    );
    let dout = View::bhld("dout", &p.dout, [2, 2, 203, 16]).unwrap();
    let thirds = cuts(203, &[64, 134]);
    for (name, mask) in [
        ("causal", Mask::causal()),
        ("documents", Mask::documents(doc_ids(203), 2)),
        ("window", Mask::window(40, 3)),
    ] {
        let block = BlockMask::new(&mask, p.shape()).unwrap();
        let f = maskattn::forward(&q, &k, &v, &block, &Params::default()).unwrap();
        let out = View::bhld("out", &f.out, [2, 2, 203, 16]).unwrap();
        let g = maskattn::backward(
            &Qkv::new(&q, &k, &v),
            &out,
            &f.lse,
            &dout,
            &block,
            &Params::default(),
        )
        .unwrap();
        let r = p.run_blocked(
            (&qh, &kh, &vh),
            &mask,
            &thirds,
            &thirds,
            (64, 64),
            With::default(),
        );
        for (what, got, want) in [
            ("out", &r.out, &f.out),
            ("lse", &r.lse, &f.lse),
            ("dq", &r.grads.dq, &g.dq),
            ("dk", &r.grads.dk, &g.dk),
            ("dv", &r.grads.dv, &g.dv),
        ] {
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            let ulp = 2f32.powi(scale.log2().floor() as i32 - 7);
            let err = got
                .iter()
                .zip(want.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= ulp,
                "{what} ({name}): blocks differ from the whole by {err:e} > {ulp:e}"
            );
        }
    }
}

/// The hidden block pairs of a causal 3 × 3 grid (the three above the diagonal) and of a
/// documents mask whose documents end on the block boundaries are all-empty block masks;
/// the others are not. What a ring skips, and does not send.
#[test]
fn hidden_blocks_compile_to_all_empty_block_masks() {
    let s = MaskShape::new(1, 1, 203, 203);
    let thirds = cuts(203, &[64, 134]);
    let ids: Vec<i64> = (0..203)
        .map(|i| (i >= 64) as i64 + (i >= 134) as i64)
        .collect();
    for (mask, want) in [
        (Mask::causal(), 3),
        (Mask::documents(ids, 1), 6),
        (Mask::full(), 0),
        (Mask::window(10, 0), 3 + 1),
    ] {
        let mut empty = 0;
        for qr in &thirds {
            for kr in &thirds {
                let bm = BlockMask::new_block(&mask, s, qr.clone(), kr.clone()).unwrap();
                assert_eq!(bm.shape(), MaskShape::new(1, 1, qr.len(), kr.len()));
                assert_eq!(bm.offsets(), (qr.start, kr.start));
                empty += bm.all_empty() as usize;
            }
        }
        assert_eq!(empty, want, "{mask}");
    }
    // An empty range is a block with no tiles: nothing to compute.
    let bm = BlockMask::new_block(&Mask::full(), s, 5..5, 0..203).unwrap();
    assert!(bm.all_empty());
}

/// Bad arguments are typed errors naming what is wrong, before any work.
#[test]
fn bad_blocks_and_dlse_are_typed_errors() {
    let s = MaskShape::new(1, 2, 100, 120);
    let e = BlockMask::new_block(&Mask::causal(), s, 90..101, 0..120).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::BlockRange {
                what: "q_range",
                end: 101,
                len: 100,
                ..
            }
        ),
        "{e}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let e = BlockMask::new_block(&Mask::causal(), s, 0..10, 30..20).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::BlockRange {
                what: "k_range",
                ..
            }
        ),
        "{e}"
    );

    // A dLSE of the wrong length.
    let p = Problem::new(3, [1, 2, 2, 100, 120, 8]);
    let r = 20..60;
    let (q, k, v) = (
        p.q_rows(&p.q, &r),
        p.kv_rows("k", &p.k, &(0..120)),
        p.kv_rows("v", &p.v, &(0..120)),
    );
    let bm = BlockMask::new_block(&Mask::causal(), s, r.clone(), 0..120).unwrap();
    let f = maskattn::forward(&q, &k, &v, &bm, &Params::default()).unwrap();
    let out = View::bhld("out", &f.out, [1, 2, 40, 8]).unwrap();
    let dl = vec![0f32; 79];
    let up = Upstream::new(&out).with_dlse(&dl);
    let e = maskattn::backward_upstream(
        &Qkv::new(&q, &k, &v),
        &out,
        &f.lse,
        up,
        &bm,
        &Params::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("dlse"), "{e}");
}
