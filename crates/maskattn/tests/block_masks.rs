//! Block mask classes and bitmaps against an element-by-element scan, for every mask kind.

mod common;

use common::{grid_of, random_dense, random_mask, Rng};
use maskattn::{BlockMask, Mask, MaskShape, Tile, TileClass};

/// Compiles `mask` and checks every tile of every (b, h) against `allowed` pair by pair,
/// and the stats against a full count.
fn check_against_scan(mask: &Mask, s: MaskShape, tq: usize, tk: usize) {
    let bm = BlockMask::with_tiles(mask, s, tq, tk).unwrap();
    let (nq, nk) = bm.grid();
    assert_eq!((nq, nk), (s.lq.div_ceil(tq), s.lk.div_ceil(tk)));
    let (mut allowed_total, mut empty, mut full, mut partial) = (0u64, 0u64, 0u64, 0u64);
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qt in 0..nq {
                for kt in 0..nk {
                    let (mut any, mut all) = (false, true);
                    let tile = bm.tile(b, h, qt, kt);
                    for i in qt * tq..((qt + 1) * tq).min(s.lq) {
                        for j in kt * tk..((kt + 1) * tk).min(s.lk) {
                            let a = mask.allowed(&s, b, h, i, j);
                            any |= a;
                            all &= a;
                            allowed_total += a as u64;
                            if let Tile::Partial(bits) = tile {
                                let (r, c) = (i - qt * tq, j - kt * tk);
                                let bit = bits[r * bm.words() + c / 64] >> (c % 64) & 1 == 1;
                                assert_eq!(bit, a, "{mask:?} bit ({b},{h},{i},{j})");
                            }
                        }
                    }
                    let want = if !any {
                        TileClass::Empty
                    } else if all {
                        TileClass::Full
                    } else {
                        TileClass::Partial
                    };
                    assert_eq!(
                        bm.class(b, h, qt, kt),
                        want,
                        "{mask:?} tile ({b},{h},{qt},{kt}) of {tq}x{tk}"
                    );
                    match want {
                        TileClass::Empty => empty += 1,
                        TileClass::Full => full += 1,
                        TileClass::Partial => partial += 1,
                    }
                }
            }
        }
    }
    let st = bm.stats();
    assert_eq!(st.allowed_pairs, allowed_total, "{mask:?} allowed pairs");
    assert_eq!(
        (st.empty, st.full, st.partial),
        (empty, full, partial),
        "{mask:?} tile counts"
    );
    assert_eq!(st.tiles, (s.batch * s.heads * nq * nk) as u64);
    assert_eq!(st.total_pairs, (s.batch * s.heads * s.lq * s.lk) as u64);
}

const TILES: [(usize, usize); 5] = [(64, 64), (1, 1), (7, 13), (16, 100), (32, 8)];

fn shapes() -> Vec<MaskShape> {
    vec![
        MaskShape::new(2, 3, 50, 50),
        MaskShape::new(2, 2, 37, 91), // L_q < L_k: bottom-right alignment matters
        MaskShape::new(1, 2, 91, 37), // L_q > L_k
        MaskShape::new(3, 1, 1, 70),  // one query
    ]
}

/// Every kind of the vocabulary, one by one, with its data drawn for the shape.
fn every_kind(s: &MaskShape, rng: &mut Rng) -> Vec<Mask> {
    let lens = |n: usize, rng: &mut Rng| (0..s.batch).map(|_| rng.below(n + 1)).collect::<Vec<_>>();
    let sorted_ids = |n: usize, rng: &mut Rng| {
        let mut v: Vec<i64> = (0..s.batch * n).map(|_| rng.below(4) as i64).collect();
        v.chunks_mut(n).for_each(|c| c.sort());
        v
    };
    let q_ids = sorted_ids(s.lq, rng);
    let k_ids = sorted_ids(s.lk, rng);
    let keep: Vec<bool> = (0..s.batch * s.lk).map(|_| rng.below(3) != 0).collect();
    vec![
        Mask::full(),
        Mask::causal(),
        Mask::causal_top_left(),
        Mask::window(5, 0),
        Mask::window(3, 7),
        Mask::window(0, 0),
        Mask::window(usize::MAX, 2),
        Mask::key_padding(lens(s.lk, rng)),
        Mask::key_padding(vec![s.lk / 2]),
        Mask::key_keep(keep, s.batch),
        Mask::query_padding(lens(s.lq, rng)),
        Mask::documents_cross(q_ids.clone(), k_ids.clone(), s.batch),
        // Unsorted ids: documents interleaved.
        Mask::documents_cross(
            (0..s.lq).map(|i| (i % 3) as i64).collect::<Vec<_>>(),
            (0..s.lk).map(|j| (j % 2) as i64).collect::<Vec<_>>(),
            1,
        ),
        Mask::prefix(s.lk / 3),
        Mask::prefix_per_batch(lens(s.lk, rng)),
        Mask::dense(random_dense(rng, s)),
        Mask::from_fn(|b, h, i, j| (i + j + b + h) % 3 == 0),
        Mask::from_fn_ij(|i, j| j * 2 <= i + 4),
        Mask::per_head(
            (0..s.heads)
                .map(|h| Mask::window(h * 4, 0))
                .collect::<Vec<_>>(),
        ),
        Mask::causal() & Mask::key_padding(lens(s.lk, rng)),
        Mask::causal() | Mask::window(0, 3),
        !Mask::causal(),
        Mask::documents_cross(q_ids, k_ids, s.batch) & Mask::causal(),
        Mask::chunks(7),
        Mask::chunks(1),
        Mask::causal() & Mask::chunks(16),
        Mask::block_causal(5),
        Mask::block_causal(64),
        Mask::block_causal(4) & Mask::window(9, usize::MAX),
        Mask::neighbourhood(grid_of(s.lk).0, grid_of(s.lk).1, 1),
        Mask::neighbourhood(grid_of(s.lk).0, grid_of(s.lk).1, 3) & Mask::causal(),
        Mask::neighbourhood(1, s.lk, 2),
        {
            let (h, w) = grid_of(s.lk);
            Mask::natten(h, w, if h.min(w) >= 3 { 3 } else { 1 })
        },
        Mask::natten(1, s.lk, 1) & Mask::causal(),
        {
            // The largest window that divides both sides, shifted by half of it.
            let (h, w) = grid_of(s.lk);
            let win = (1..=h.min(w))
                .rev()
                .find(|x| h.is_multiple_of(*x) && w.is_multiple_of(*x))
                .unwrap();
            Mask::swin(h, w, win, win / 2)
        },
        Mask::chunked(7, Some(1)),
        Mask::chunked(5, None) & Mask::window(9, usize::MAX),
    ]
}

#[test]
fn every_kind_matches_an_element_scan() {
    let mut rng = Rng::new(11);
    for s in shapes() {
        for mask in every_kind(&s, &mut rng) {
            for (tq, tk) in TILES {
                check_against_scan(&mask, s, tq, tk);
            }
        }
    }
}

#[test]
fn random_compositions_match_an_element_scan() {
    let mut rng = Rng::new(5);
    for round in 0..200 {
        let s = MaskShape::new(
            1 + rng.below(2),
            1 + rng.below(3),
            1 + rng.below(60),
            1 + rng.below(60),
        );
        let mask = random_mask(&mut rng, &s, 3);
        let (tq, tk) = TILES[round % TILES.len()];
        check_against_scan(&mask, s, tq, tk);
    }
}

#[test]
fn a_sliding_window_skips_most_tiles() {
    let s = MaskShape::new(1, 1, 4096, 4096);
    let bm = BlockMask::new(&Mask::window(256, 0), s).unwrap();
    let st = bm.stats();
    // Exactly the pairs with 0 ≤ i − j ≤ 256.
    let allowed: u64 = (0..4096u64).map(|i| i.min(256) + 1).sum();
    assert_eq!(st.allowed_pairs, allowed);
    // 64-wide tiles: each query tile row touches at most 6 key tiles out of 64.
    assert!(st.skipped_tile_fraction() > 0.9, "{st:?}");
    assert!((st.hidden_pair_fraction() - (1.0 - allowed as f64 / 4096.0 / 4096.0)).abs() < 1e-12);
}

#[test]
fn chunked_masks_skip_every_tile_outside_their_chunks() {
    let s = MaskShape::new(1, 1, 4096, 4096);
    // Chunks of 512 on 64-wide tiles: 8 chunks of 8 × 8 tiles, all full; the rest skipped.
    let st = BlockMask::new(&Mask::chunks(512), s).unwrap().stats();
    assert_eq!(
        (st.full, st.partial, st.empty),
        (8 * 64, 0, 4096 - 8 * 64),
        "{st:?}"
    );
    assert_eq!(st.allowed_pairs, 8 * 512 * 512);
    // Block-causal over the same chunks: chunk c sees chunks 0..=c.
    let st = BlockMask::new(&Mask::block_causal(512), s).unwrap().stats();
    assert_eq!(st.full, 64 * (1..=8).sum::<u64>(), "{st:?}");
    assert_eq!(st.partial, 0);
    assert_eq!(st.allowed_pairs, 512 * 512 * (1..=8).sum::<u64>());
    // Chunks of 100 cut tiles: the cut ones are partial, and still exact.
    let st = BlockMask::new(&(Mask::causal() & Mask::chunks(100)), s)
        .unwrap()
        .stats();
    let allowed: u64 = (0..4096u64).map(|i| i % 100 + 1).sum();
    assert_eq!(st.allowed_pairs, allowed);
    assert!(st.skipped_tile_fraction() > 0.95, "{st:?}");
}

#[test]
fn a_neighbourhood_on_an_image_grid_skips_most_tiles() {
    // A 64 × 64 patch grid, 7 × 7 neighbourhoods: exactly the pairs within 3 rows and 3
    // columns, and a 64-position tile row (one grid row) meets at most 7 key tiles of 64.
    let s = MaskShape::new(1, 1, 4096, 4096);
    let st = BlockMask::new(&Mask::neighbourhood(64, 64, 3), s)
        .unwrap()
        .stats();
    let per_axis: u64 = (0..64i64)
        .map(|r| (0..64i64).filter(|q| (r - q).abs() <= 3).count() as u64)
        .sum();
    assert_eq!(st.allowed_pairs, per_axis * per_axis);
    assert!(st.skipped_tile_fraction() > 0.89, "{st:?}");
}
