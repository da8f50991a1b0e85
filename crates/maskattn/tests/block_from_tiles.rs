//! `BlockMask::from_tiles` (tile classes decided outside the crate, as the Python package's
//! `from_mask_mod` sends them) against `BlockMask::with_tiles` compiling the same mask.

mod common;

use common::Rng;
use maskattn::{AttnError, BlockMask, Mask, MaskShape, Tile, TileClass};

/// What an outside caller sends for `mask`: every tile's class from an element scan, with
/// `as_partial` of them sent as `Partial` whatever they are (the constructor must settle
/// them), and junk `true`s past the sequence's end in last tiles (it must ignore them).
fn send(
    mask: &Mask,
    s: MaskShape,
    (tq, tk): (usize, usize),
    rng: &mut Rng,
) -> (Vec<TileClass>, Vec<bool>) {
    let (nq, nk) = (s.lq.div_ceil(tq), s.lk.div_ceil(tk));
    let (mut classes, mut partial) = (Vec::new(), Vec::new());
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qt in 0..nq {
                for kt in 0..nk {
                    let mut tile = vec![true; tq * tk];
                    let (mut any, mut all) = (false, true);
                    for r in 0..tq {
                        for c in 0..tk {
                            let (i, j) = (qt * tq + r, kt * tk + c);
                            if i < s.lq && j < s.lk {
                                let a = mask.allowed(&s, b, h, i, j);
                                tile[r * tk + c] = a;
                                any |= a;
                                all &= a;
                            }
                        }
                    }
                    let class = if any && !all || rng.below(4) == 0 {
                        TileClass::Partial
                    } else if all {
                        TileClass::Full
                    } else {
                        TileClass::Empty
                    };
                    if class == TileClass::Partial {
                        partial.extend(tile);
                    }
                    classes.push(class);
                }
            }
        }
    }
    (classes, partial)
}

fn assert_same(got: &BlockMask, want: &BlockMask, what: &str) {
    let s = want.shape();
    assert_eq!(got.shape(), s, "{what}");
    assert_eq!(got.grid(), want.grid(), "{what}");
    assert_eq!(got.stats(), want.stats(), "{what} stats");
    let (nq, nk) = want.grid();
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qt in 0..nq {
                for kt in 0..nk {
                    let at = format!("{what} tile ({b},{h},{qt},{kt})");
                    match (got.tile(b, h, qt, kt), want.tile(b, h, qt, kt)) {
                        (Tile::Partial(x), Tile::Partial(y)) => assert_eq!(x, y, "{at} bits"),
                        (x, y) => assert_eq!(format!("{x:?}"), format!("{y:?}"), "{at}"),
                    }
                }
            }
        }
    }
}

#[test]
fn tiles_sent_from_outside_compile_to_what_the_crate_compiles() {
    let mut rng = Rng::new(5);
    let shapes = [
        MaskShape::new(2, 3, 67, 131),
        MaskShape::new(1, 2, 131, 45),
        MaskShape::new(3, 1, 1, 70),
    ];
    for s in shapes {
        let masks = [
            Mask::causal(),
            Mask::window(9, 3),
            Mask::key_padding(
                (0..s.batch)
                    .map(|_| rng.below(s.lk + 1))
                    .collect::<Vec<_>>(),
            ),
            Mask::from_fn(|b, h, i, j| (i * 7 + j * 3 + b + h) % 5 != 0),
            !Mask::full(),
            Mask::full(),
        ];
        for mask in masks {
            for tiles in [(64, 64), (7, 13), (16, 100)] {
                let want = BlockMask::with_tiles(&mask, s, tiles.0, tiles.1).unwrap();
                // `with_tiles` clamps a tile to the sequence; an outside caller sends the
                // clamped sizes (the Python package asks `tile_sizes` for them).
                let tiles = (want.tile_q(), want.tile_k());
                // The crate's own table has one row per batch row and head only where the
                // mask varies; send the full table, which must mean the same.
                let (classes, partial) = send(&mask, s, tiles, &mut rng);
                let got = BlockMask::from_tiles(s, tiles, (s.batch, s.heads), &classes, &partial)
                    .unwrap();
                assert_same(&got, &want, &format!("{mask:?} {s:?} {tiles:?}"));
            }
        }
    }
}

#[test]
fn a_shared_table_serves_every_batch_row_and_head() {
    let s = MaskShape::new(3, 4, 100, 100);
    let mask = Mask::causal();
    let one = MaskShape::new(1, 1, 100, 100);
    let (classes, partial) = send(&mask, one, (64, 64), &mut Rng::new(1));
    let got = BlockMask::from_tiles(s, (64, 64), (1, 1), &classes, &partial).unwrap();
    assert_same(&got, &BlockMask::new(&mask, s).unwrap(), "shared causal");
}

#[test]
fn wrong_sizes_are_errors_naming_what_is_wrong() {
    let s = MaskShape::new(2, 2, 100, 100);
    let four = vec![TileClass::Full; 4];
    let err = |r: maskattn::Result<BlockMask>| match r {
        Err(AttnError::ShapeMismatch { what }) => what,
        other => panic!("expected ShapeMismatch, got {other:?}"),
    };
    assert!(err(BlockMask::from_tiles(s, (64, 64), (3, 1), &four, &[])).contains("batch rows 3"));
    assert!(err(BlockMask::from_tiles(s, (64, 64), (1, 3), &four, &[])).contains("heads 3"));
    assert!(
        err(BlockMask::from_tiles(s, (64, 64), (1, 1), &four[..3], &[]))
            .contains("tile classes: 3")
    );
    let mut one_partial = four.clone();
    one_partial[0] = TileClass::Partial;
    assert!(err(BlockMask::from_tiles(
        s,
        (64, 64),
        (1, 1),
        &one_partial,
        &[true; 10]
    ))
    .contains("partial tiles: 10"));
    assert!(matches!(
        BlockMask::from_tiles(s, (0, 64), (1, 1), &four, &[]),
        Err(AttnError::BadTiles { .. })
    ));
}
