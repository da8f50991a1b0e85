//! Sizes at their extremes: every size and offset in the mask vocabulary means what it
//! says for any `usize` value (or is a typed error), and a shape that does not fit in memory
//! arithmetic is a typed error, never a wrapped product.

use maskattn::{AttnError, BlockMask, DenseMask, Mask, MaskShape, Tile, TileClass, View};

/// The element-wise definition of docs/design.md section 2, in `i128` so that no `usize` value of
/// a size or a length can overflow it: an oracle independent of the kernel crate's arithmetic.
fn defined(m: &Mask, s: &MaskShape, i: usize, j: usize) -> bool {
    let (i, j) = (i as i128, j as i128);
    let ii = i + s.lk as i128 - s.lq as i128; // i' (bottom-right aligned)
    match m {
        Mask::Window { left, right } => ii - *left as i128 <= j && j <= ii + *right as i128,
        Mask::Chunks { size, earlier } => {
            let (qc, kc) = (ii.div_euclid(*size as i128), j / *size as i128);
            if *earlier {
                kc <= qc
            } else {
                kc == qc
            }
        }
        Mask::Neighbourhood { width, radius, .. } => {
            let w = *width as i128;
            let r = *radius as i128;
            ii >= 0 && (ii / w - j / w).abs() <= r && (ii % w - j % w).abs() <= r
        }
        Mask::Causal(_) => j <= ii,
        _ => unreachable!("only the masks with sizes"),
    }
}

/// Compiles `mask` for `s` with several tile sizes and checks every pair of every tile (the
/// class and the bitmap) and `Mask::allowed` against [`defined`].
fn check(mask: &Mask, s: MaskShape) {
    for (tq, tk) in [(64, 64), (1, 1), (7, 13), (usize::MAX, usize::MAX / 2)] {
        let bm = BlockMask::with_tiles(mask, s, tq, tk)
            .unwrap_or_else(|e| panic!("{mask:?} {s:?} {tq}x{tk}: {e}"));
        let (nq, nk) = bm.grid();
        for qt in 0..nq {
            for kt in 0..nk {
                let (i0, j0) = (qt * bm.tile_q(), kt * bm.tile_k());
                let (i1, j1) = (
                    i0 + bm.tile_q().min(s.lq - i0),
                    j0 + bm.tile_k().min(s.lk - j0),
                );
                let (mut any, mut all) = (false, true);
                for i in i0..i1 {
                    for j in j0..j1 {
                        let want = defined(mask, &s, i, j);
                        assert_eq!(
                            mask.allowed(&s, 0, 0, i, j),
                            want,
                            "{mask:?} {s:?} ({i},{j})"
                        );
                        if let Tile::Partial(bits) = bm.tile(0, 0, qt, kt) {
                            let (r, c) = (i - i0, j - j0);
                            let bit = bits[r * bm.words() + c / 64] >> (c % 64) & 1 == 1;
                            assert_eq!(bit, want, "{mask:?} {s:?} bit ({i},{j})");
                        }
                        any |= want;
                        all &= want;
                    }
                }
                let class = match (any, all) {
                    (false, _) => TileClass::Empty,
                    (true, true) => TileClass::Full,
                    _ => TileClass::Partial,
                };
                assert_eq!(bm.class(0, 0, qt, kt), class, "{mask:?} {s:?} {tq}x{tk}");
            }
        }
    }
}

const HUGE: [usize; 6] = [
    usize::MAX,
    usize::MAX - 1,
    usize::MAX / 2,
    usize::MAX / 2 + 1,
    i64::MAX as usize / 4,
    i64::MAX as usize / 4 + 1,
];

fn shapes() -> [MaskShape; 4] {
    [
        MaskShape::new(1, 1, 40, 40),
        MaskShape::new(1, 1, 17, 45),
        MaskShape::new(1, 1, 45, 17),
        MaskShape::new(1, 1, 1, 30),
    ]
}

#[test]
fn huge_chunks_hide_nothing_within_the_sequence() {
    for size in HUGE {
        // Self-attention: one chunk covers everything, so chunks hides nothing and
        // block-causal hides nothing either (the whole sequence is the current chunk).
        for mask in [Mask::chunks(size), Mask::block_causal(size)] {
            let s = MaskShape::new(1, 1, 50, 50);
            let bm = BlockMask::new(&mask, s).unwrap();
            assert_eq!(bm.stats().hidden_pair_fraction(), 0.0, "{mask:?}");
        }
    }
}

#[test]
fn chunk_sizes_at_their_extremes_follow_the_definition() {
    for s in shapes() {
        let sizes = HUGE
            .iter()
            .copied()
            .chain([1, 2, 5, s.lk, s.lk + 1, s.lq + 3]);
        for size in sizes {
            check(&Mask::chunks(size), s);
            check(&Mask::block_causal(size), s);
        }
    }
}

#[test]
fn window_sides_at_their_extremes_follow_the_definition() {
    for s in shapes() {
        let sides = HUGE.iter().copied().chain([0, 1, s.lk, s.lq + 1]);
        for left in sides.clone() {
            for right in [0, 3, usize::MAX, usize::MAX / 2 + 1] {
                check(&Mask::window(left, right), s);
                check(&Mask::window(right, left), s);
            }
        }
    }
}

#[test]
fn neighbourhood_radius_and_grid_at_their_extremes_follow_the_definition() {
    for (h, w) in [(1, 30), (30, 1), (5, 6)] {
        for lq in [30, 7, 41] {
            let s = MaskShape::new(1, 1, lq, 30);
            for radius in HUGE.iter().copied().chain([0, 1, 29, 30]) {
                check(&Mask::neighbourhood(h, w, radius), s);
            }
        }
    }
    // A grid whose cell count overflows is a typed error, not a wrapped product.
    let e = BlockMask::new(
        &Mask::neighbourhood(1 << 33, 1 << 31, 1),
        MaskShape::new(1, 1, 4, 4),
    )
    .unwrap_err();
    assert!(matches!(e, AttnError::Mask(_)), "{e}");
}

#[test]
fn prefix_and_lengths_past_the_sequence_are_typed_errors() {
    let s = MaskShape::new(1, 1, 8, 8);
    for m in [
        Mask::prefix(usize::MAX),
        Mask::key_padding(vec![usize::MAX]),
        Mask::query_padding(vec![usize::MAX / 2 + 1]),
    ] {
        let e = BlockMask::new(&m, s).unwrap_err();
        assert!(matches!(e, AttnError::Mask(_)), "{m:?}: {e}");
    }
    // At the limit they mean what they say.
    let bm = BlockMask::new(&Mask::prefix(8), s).unwrap();
    assert_eq!(bm.stats().hidden_pair_fraction(), 0.0);
}

#[test]
fn lengths_past_i64_are_a_typed_error_not_a_wrapped_offset() {
    // `L_k − L_q` must be exact; a length that no i64 holds is refused before any tile is
    // classified.
    for (lq, lk) in [(usize::MAX, 1), (1, usize::MAX), (1 << 63, 1 << 63)] {
        let e = BlockMask::new(&Mask::causal(), MaskShape::new(1, 1, lq, lk)).unwrap_err();
        assert!(
            matches!(e, AttnError::SizeOverflow { .. }),
            "{lq} {lk}: {e}"
        );
    }
}

#[test]
fn block_masks_too_large_to_index_are_typed_errors() {
    // A mask that differs per batch row and head makes the block mask store every one.
    let per_bh = Mask::from_fn(|b, h, i, j| (b + h + i) >= j);
    let cases = [
        (MaskShape::new(1, 1, 1 << 40, 1 << 40), 64), // tiles: 2^68
        (MaskShape::new(1 << 62, 1, 8, 8), 1),        // rows × tiles: 2^68
        (MaskShape::new(1 << 33, 1 << 33, 8, 8), 8),  // B · H: 2^66
        (MaskShape::new(1, 1, 1 << 31, 1 << 31), 1),  // 2^62 tiles of 4 bytes
        (MaskShape::new(1, 1, 1 << 24, 1 << 24), 1),  // fits the arithmetic, not memory
    ];
    for (s, t) in cases {
        match BlockMask::with_tiles(&per_bh, s, t, t) {
            Err(AttnError::SizeOverflow { .. }) => {}
            Err(e) => panic!("{s:?} {t}x{t}: {e}"),
            Ok(_) => panic!("{s:?} {t}x{t}: compiled"),
        }
    }
}

#[test]
fn tiles_larger_than_the_sequence_mean_the_whole_sequence() {
    let s = MaskShape::new(1, 1, 9, 9);
    for t in [usize::MAX, usize::MAX / 2 + 1, 1 << 40, 10] {
        let bm = BlockMask::with_tiles(&Mask::causal(), s, t, t).unwrap();
        assert_eq!(bm.grid(), (1, 1));
        assert_eq!((bm.tile_q(), bm.tile_k()), (9, 9));
        assert_eq!(bm.stats().allowed_pairs, 45);
    }
}

#[test]
fn dense_masks_whose_dims_overflow_are_refused() {
    let e = DenseMask::new(Vec::<bool>::new(), [1 << 32, 1 << 32, 1, 1]).unwrap_err();
    assert!(matches!(e, AttnError::SizeOverflow { .. }), "{e}");
    let e = DenseMask::new(vec![true; 2], [2, 0, usize::MAX, 3]).unwrap_err();
    assert!(matches!(e, AttnError::Mask(_)), "{e}");
}

#[test]
fn views_whose_sizes_overflow_are_refused() {
    let data = vec![0f32; 2];
    // 3 · 6148914691236517206 wraps to 2.
    let e = View::bhld("q", &data, [3, 6148914691236517206, 1, 1]).unwrap_err();
    assert!(
        matches!(e, AttnError::SizeOverflow { name: "q", .. }),
        "{e}"
    );
    let e = View::blhd("k", &data, [3, 1, 6148914691236517206, 1]).unwrap_err();
    assert!(
        matches!(e, AttnError::SizeOverflow { name: "k", .. }),
        "{e}"
    );
    // 1 + (2 − 1) · usize::MAX wraps to 0.
    let e = View::strided("v", &data, [2, 1, 1, 1], [usize::MAX, 0, 0, 0]).unwrap_err();
    assert!(
        matches!(e, AttnError::SizeOverflow { name: "v", .. }),
        "{e}"
    );
    let e = View::strided("v", &data, [1 << 33, 1, 1, 2], [1 << 32, 0, 0, 1]).unwrap_err();
    assert!(matches!(e, AttnError::SizeOverflow { .. }), "{e}");
    // The strides of a contiguous view overflow even when a zero makes the size 0.
    let e = View::bhld("q", &data[..0], [0, 1 << 32, 1 << 32, 1]).unwrap_err();
    assert!(matches!(e, AttnError::SizeOverflow { .. }), "{e}");
    // Broadcast views (stride 0) stay legal, but the outputs they imply must be allocatable.
    let q = View::strided("q", &data, [1, 1, usize::MAX / 2, 2], [0, 0, 0, 1]).unwrap();
    let k = View::strided("k", &data, [1, 1, 4, 2], [0, 0, 0, 1]).unwrap();
    let e = maskattn::AttnDims::of(&q, &k, &k).unwrap_err();
    assert!(matches!(e, AttnError::SizeOverflow { .. }), "{e}");
}
