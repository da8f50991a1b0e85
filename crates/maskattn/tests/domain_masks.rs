//! The masks of the vision and speech domains — `natten`, `swin`, `chunked` — against
//! references written from their published definitions (docs/design.md section 2), pair by
//! pair on grids with borders and odd sizes; their block masks' tile classes against the
//! dense pair grid; and the kernels, forward and backward, against the f64 reference.

mod common;

use common::random_case;
use maskattn::{AttnError, BlockMask, Mask, MaskShape, Tile, TileClass};

// ---------------------------------------------------------------- the references

/// NATTEN's `get_window_start` (its CPU kernels, `natten/csrc/.../natten_commons`; the
/// same window as the "phase-aligned" form of later releases): where the `kernel_size`
/// positions `start, start + dilation, …` that `index` attends to begin on an axis of
/// `length`, with `neighborhood_size = kernel_size / 2`. Written as NATTEN writes it, not
/// as the crate does (the crate clamps on a sub-axis per dilation group).
fn natten_window_start(index: i64, length: i64, kernel_size: i64, dilation: i64) -> i64 {
    let neighborhood_size = kernel_size / 2;
    if dilation <= 1 {
        return (index - neighborhood_size).max(0)
            + if index + neighborhood_size >= length {
                length - index - neighborhood_size - 1
            } else {
                0
            };
    }
    let ni = index - neighborhood_size * dilation;
    if ni < 0 {
        return index % dilation;
    }
    if index + neighborhood_size * dilation >= length {
        let imodd = index % dilation;
        let a = (length / dilation) * dilation;
        let b = length - a;
        if imodd < b {
            return length - b + imodd - 2 * neighborhood_size * dilation;
        }
        return a + imodd - kernel_size * dilation;
    }
    ni
}

/// NATTEN 2-D: key `(y', x')` is in query `(y, x)`'s neighbourhood when each coordinate is
/// one of the `k` positions of the query's window on that axis.
fn natten_ref(h: usize, w: usize, k: usize, d: usize, q: usize, key: usize) -> bool {
    let on_axis = |x: usize, n: usize, x2: usize| {
        let start = natten_window_start(x as i64, n as i64, k as i64, d as i64);
        (0..k as i64).any(|t| start + t * d as i64 == x2 as i64)
    };
    on_axis(q / w, h, key / w) && on_axis(q % w, w, key % w)
}

/// The formula for NATTEN without dilation: `|clamp(y, k/2, H−1−k/2) − y'| ≤ k/2`
/// and the same for `x`.
fn natten_clamp_formula(h: usize, w: usize, k: usize, q: usize, key: usize) -> bool {
    let r = k / 2;
    let near = |x: usize, n: usize, x2: usize| x.clamp(r, n - 1 - r).abs_diff(x2) <= r;
    near(q / w, h, key / w) && near(q % w, w, key % w)
}

/// Python's `a[start:stop]` bounds on a list of `n` (negative indices count from the end).
fn py_slice(n: usize, start: i64, stop: Option<i64>) -> std::ops::Range<usize> {
    let fix = |x: i64| if x < 0 { (n as i64 + x).max(0) } else { x.min(n as i64) } as usize;
    let (a, b) = (fix(start), stop.map_or(n, fix));
    a..b.max(a)
}

/// Swin Transformer's `SwinTransformerBlock`, literally: `torch.roll(x, (−s, −s))`, then
/// `window_partition`, then (when `s > 0`) the `img_mask` built from `h_slices` and
/// `w_slices` with `attn_mask = mask_windows.unsqueeze(1) − mask_windows.unsqueeze(2)`:
/// two tokens attend when they share a window and their `img_mask` values are equal.
/// Returns, for each ORIGINAL token (row-major), its window and its region id.
fn swin_ref(h: usize, w: usize, win: usize, s: usize) -> Vec<(usize, usize)> {
    // img_mask over the rolled grid.
    let mut img_mask = vec![0usize; h * w];
    if s > 0 {
        let (win, s) = (win as i64, s as i64);
        let h_slices = [(0, Some(-win)), (-win, Some(-s)), (-s, None)];
        let w_slices = h_slices;
        let mut cnt = 0;
        for &(h0, h1) in &h_slices {
            for &(w0, w1) in &w_slices {
                for y in py_slice(h, h0, h1) {
                    for x in py_slice(w, w0, w1) {
                        img_mask[y * w + x] = cnt;
                    }
                }
                cnt += 1;
            }
        }
    }
    // torch.roll(tokens, shifts=(−s, −s)): out[(i + shift) mod n] = in[i].
    let tokens: Vec<usize> = (0..h * w).collect();
    let mut rolled = vec![0usize; h * w];
    for y in 0..h {
        for x in 0..w {
            let (yr, xr) = ((y + h - s) % h, (x + w - s) % w);
            rolled[yr * w + xr] = tokens[y * w + x];
        }
    }
    // window_partition: window (yr / win, xr / win) of the rolled grid, numbered row-major.
    let mut of_token = vec![(0, 0); h * w];
    for yr in 0..h {
        for xr in 0..w {
            let window = (yr / win) * (w / win) + xr / win;
            of_token[rolled[yr * w + xr]] = (window, img_mask[yr * w + xr]);
        }
    }
    of_token
}

/// WeNet's `subsequent_chunk_mask(size, chunk_size, num_left_chunks)` (wenet/utils/mask.py),
/// as its loop writes it; `None` is `num_left_chunks = −1`.
fn wenet_chunk_mask(size: usize, chunk: usize, left: Option<usize>) -> Vec<Vec<bool>> {
    let mut ret = vec![vec![false; size]; size];
    for (i, row) in ret.iter_mut().enumerate() {
        let start = match left {
            None => 0,
            Some(l) => ((i / chunk) as i64 - l as i64).max(0) as usize * chunk,
        };
        let ending = ((i / chunk + 1) * chunk).min(size);
        for x in &mut row[start..ending] {
            *x = true;
        }
    }
    ret
}

// ---------------------------------------------------------------- pair by pair

/// `Mask::allowed` over `s` against `want(i', j)`, where `i' = i + L_k − L_q` is the
/// bottom-right aligned query (queries with `i' < 0` must see nothing).
fn assert_pairs(mask: &Mask, s: MaskShape, want: impl Fn(usize, usize) -> bool) {
    mask.validate(&s).unwrap();
    let mut allowed = 0;
    for i in 0..s.lq {
        let qi = i as i64 + s.lk as i64 - s.lq as i64;
        for j in 0..s.lk {
            let w = qi >= 0 && want(qi as usize, j);
            assert_eq!(mask.allowed(&s, 0, 0, i, j), w, "{mask} {s} ({i},{j})");
            allowed += w as usize;
        }
    }
    assert!(allowed > 0, "{mask} {s}: the case hides every pair");
}

#[test]
fn natten_is_natten_on_grids_with_borders_and_odd_sizes() {
    let mut cases = 0;
    for (h, w) in [(7, 9), (9, 7), (5, 5), (1, 11), (11, 3)] {
        for k in [1, 3, 5, 7] {
            for d in [1, 2, 3] {
                if k * d > h.min(w) {
                    continue;
                }
                let n = h * w;
                let m = Mask::natten_dilated(h, w, k, d);
                assert_pairs(&m, MaskShape::new(1, 1, n, n), |q, j| {
                    natten_ref(h, w, k, d, q, j)
                });
                if d == 1 {
                    assert!(m == Mask::natten(h, w, k));
                    assert_pairs(&m, MaskShape::new(1, 1, n, n), |q, j| {
                        natten_clamp_formula(h, w, k, q, j)
                    });
                }
                // Fewer queries than keys: the last ones, as in decoding.
                assert_pairs(&m, MaskShape::new(1, 1, n / 3 + 1, n), |q, j| {
                    natten_ref(h, w, k, d, q, j)
                });
                cases += 1;
            }
        }
    }
    assert!(cases >= 20, "{cases}");
    // Every query sees exactly k² keys (NATTEN keeps the window whole at the borders).
    let (h, w, k, d) = (7, 9, 3, 2);
    let s = MaskShape::new(1, 1, h * w, h * w);
    let m = Mask::natten_dilated(h, w, k, d);
    for i in 0..h * w {
        let seen = (0..h * w).filter(|&j| m.allowed(&s, 0, 0, i, j)).count();
        assert_eq!(seen, k * k, "query {i}");
    }
}

#[test]
fn swin_is_swin_on_grids_with_borders_and_odd_sizes() {
    for (h, w, win) in [(8, 12, 4), (6, 9, 3), (10, 5, 5), (4, 4, 4), (3, 6, 1)] {
        for s in 0..win {
            let of = swin_ref(h, w, win, s);
            let n = h * w;
            let m = Mask::swin(h, w, win, s);
            assert_pairs(&m, MaskShape::new(1, 1, n, n), |q, j| of[q] == of[j]);
            assert_pairs(&m, MaskShape::new(1, 1, n - 5, n), |q, j| of[q] == of[j]);
        }
    }
    // With a shift, the windows that wrap around are cut into regions: the corner patch
    // (0, 0) lands in the last window of the rolled grid, region 8, alone with the three
    // other patches of the original grid's top-left s × s block.
    let (h, w, win, s) = (8, 12, 4, 2);
    let shape = MaskShape::new(1, 1, h * w, h * w);
    let seen: Vec<usize> = (0..h * w)
        .filter(|&j| Mask::swin(h, w, win, s).allowed(&shape, 0, 0, 0, j))
        .collect();
    assert_eq!(seen, vec![0, 1, w, w + 1]);
}

#[test]
fn chunked_is_wenets_subsequent_chunk_mask() {
    let l = 37;
    for c in [1, 4, 8, 37, 50] {
        for left in [Some(0), Some(1), Some(2), Some(100), None] {
            let want = wenet_chunk_mask(l, c, left);
            let m = Mask::chunked(c, left);
            assert_pairs(&m, MaskShape::new(1, 1, l, l), |i, j| want[i][j]);
            // Streaming: the last L_q queries against the whole history (bottom-right),
            // the rows of the full mask they are.
            for lq in [1, 5, 13] {
                assert_pairs(&m, MaskShape::new(1, 1, lq, l), |i, j| want[i][j]);
            }
        }
        // Without LEFT it is block-causal, WeNet's `num_left_chunks = −1`.
        let s = MaskShape::new(1, 1, 20, l);
        let bc = Mask::block_causal(c);
        assert_pairs(&Mask::chunked(c, None), s, |i, j| {
            bc.allowed(&s, 0, 0, i - (s.lk - s.lq), j)
        });
    }
    // More queries than keys: the first L_q − L_k see nothing, the rest the full mask.
    let s = MaskShape::new(1, 1, 45, 37);
    let want = wenet_chunk_mask(37, 4, Some(1));
    assert_pairs(&Mask::chunked(4, Some(1)), s, |i, j| want[i][j]);
}

// ---------------------------------------------------------------- block masks

/// Every tile's class and bitmap against the dense pair grid.
fn assert_tiles_exact(mask: &Mask, s: MaskShape, tq: usize, tk: usize) -> BlockMask {
    let bm = BlockMask::with_tiles(mask, s, tq, tk).unwrap();
    let (nq, nk) = bm.grid();
    let mut allowed = 0u64;
    for qt in 0..nq {
        for kt in 0..nk {
            let (mut any, mut all) = (false, true);
            for i in qt * tq..((qt + 1) * tq).min(s.lq) {
                for j in kt * tk..((kt + 1) * tk).min(s.lk) {
                    let a = mask.allowed(&s, 0, 0, i, j);
                    (any, all) = (any | a, all & a);
                    allowed += a as u64;
                    if let Tile::Partial(bits) = bm.tile(0, 0, qt, kt) {
                        let (r, c) = (i - qt * tq, j - kt * tk);
                        let bit = bits[r * bm.words() + c / 64] >> (c % 64) & 1 == 1;
                        assert_eq!(bit, a, "{mask} bit ({i},{j})");
                    }
                }
            }
            let want = match (any, all) {
                (false, _) => TileClass::Empty,
                (true, true) => TileClass::Full,
                _ => TileClass::Partial,
            };
            assert_eq!(
                bm.class(0, 0, qt, kt),
                want,
                "{mask} {s} tile ({qt},{kt}) of {tq}x{tk}"
            );
        }
    }
    assert_eq!(bm.stats().allowed_pairs, allowed, "{mask} {s}");
    bm
}

#[test]
fn tile_classes_are_exact_over_several_tiles() {
    let grid_masks = [
        (20, 23, Mask::natten(20, 23, 7)),
        (20, 23, Mask::natten(20, 23, 3)),
        (20, 23, Mask::natten_dilated(20, 23, 5, 3)),
        (19, 21, Mask::natten_dilated(19, 21, 3, 2)),
        (16, 24, Mask::swin(16, 24, 8, 4)),
        (16, 24, Mask::swin(16, 24, 8, 0)),
        (15, 21, Mask::swin(15, 21, 3, 1)),
        (32, 32, Mask::swin(32, 32, 16, 7)),
    ];
    for (h, w, m) in &grid_masks {
        let n = h * w;
        for (lq, tiles) in [
            (n, (64, 64)),
            (n, (7, 13)),
            (n, (16, 100)),
            (n - 70, (64, 64)),
        ] {
            assert_tiles_exact(m, MaskShape::new(1, 1, lq, n), tiles.0, tiles.1);
        }
    }
    for m in [
        Mask::chunked(16, Some(2)),
        Mask::chunked(5, Some(1)),
        Mask::chunked(64, Some(0)),
        Mask::chunked(7, None),
    ] {
        for (lq, lk) in [(300, 300), (100, 300), (300, 170)] {
            for (tq, tk) in [(64, 64), (7, 13), (16, 100)] {
                assert_tiles_exact(&m, MaskShape::new(1, 1, lq, lk), tq, tk);
            }
        }
    }
}

/// The fractions the docs quote: tiles skipped and pairs hidden for a typical case of each
/// mask at 64 × 64 tiles. Asserted against counts taken from the pairs.
#[test]
fn typical_cases_skip_most_tiles() {
    for (m, l) in [
        (Mask::natten(32, 32, 7), 1024),
        (Mask::swin(32, 32, 8, 4), 1024),
        (Mask::chunked(16, Some(2)), 1024),
    ] {
        let bm = assert_tiles_exact(&m, MaskShape::new(1, 1, l, l), 64, 64);
        let st = bm.stats();
        assert_eq!(st.tiles, 256);
        println!(
            "{m} at L = {l}: {:.1}% of tiles skipped ({} empty, {} full, {} partial), {:.1}% of pairs hidden",
            100.0 * st.skipped_tile_fraction(),
            st.empty,
            st.full,
            st.partial,
            100.0 * st.hidden_pair_fraction()
        );
        assert!(st.skipped_tile_fraction() > 0.5, "{m}");
    }
}

// ---------------------------------------------------------------- the kernels

#[test]
fn kernels_match_the_reference_forward_and_backward() {
    let cases = [
        (Mask::natten_dilated(11, 13, 5, 2), 143, 143),
        (Mask::natten(11, 13, 7), 60, 143),
        (Mask::swin(12, 12, 4, 2), 144, 144),
        (Mask::chunked(8, Some(2)), 150, 150),
        (Mask::chunked(8, Some(1)), 40, 150),
    ];
    for (n, (mask, lq, lk)) in cases.into_iter().enumerate() {
        let mut c = random_case(n as u64, [2, 4, 2, lq, lk, 24], (64, 64), n % 2 == 0);
        c.mask = mask;
        c.dropout = None;
        c.check();
        let mut c = random_case(n as u64 + 100, [1, 2, 1, lq, lk, 16], (16, 32), false);
        c.mask = Mask::chunked(3, Some(1)) | Mask::window(1, 0);
        c.dropout = None;
        c.check();
    }
}

// ---------------------------------------------------------------- bad input

fn syntax_error(text: &str) -> String {
    match text.parse::<Mask>() {
        Err(AttnError::MaskSyntax { message, .. }) => message,
        other => panic!("{text}: expected a syntax error, got {other:?}"),
    }
}

#[test]
fn bad_numbers_are_errors_that_name_them() {
    for (text, want) in [
        ("natten(7,9,4)", "KERNEL must be odd"),
        ("natten(7,9,0)", "KERNEL must be odd"),
        ("natten(7,9,9)", "KERNEL 9 exceeds HEIGHT 7"),
        ("natten(9,7,9)", "KERNEL 9 exceeds WIDTH 7"),
        (
            "natten(7,9,3,3)",
            "KERNEL × DILATION = 3 × 3 exceeds HEIGHT 7",
        ),
        ("natten(7,9,3,0)", "DILATION must be at least 1"),
        ("natten(7,9)", "natten(HEIGHT,WIDTH,KERNEL[,DILATION])"),
        (
            "natten(7,9,3,1,1)",
            "natten(HEIGHT,WIDTH,KERNEL[,DILATION])",
        ),
        ("swin(8,12,5,0)", "WINDOW 5 must divide HEIGHT 8"),
        ("swin(8,10,4,0)", "WINDOW 4 must divide WIDTH 10"),
        ("swin(8,12,0,0)", "WINDOW must be at least 1"),
        ("swin(8,12,4,4)", "SHIFT 4 must be less than WINDOW 4"),
        ("swin(8,12,4)", "swin(HEIGHT,WIDTH,WINDOW,SHIFT)"),
        ("chunked(0)", "at least 1"),
        ("chunked(0,2)", "at least 1"),
        ("chunked(4,2,1)", "chunked(C[,LEFT])"),
        ("chunked", "expected chunked(...)"),
    ] {
        let e = syntax_error(text);
        assert!(e.contains(want), "{text}: {e}");
    }
    // Built in Rust without the grammar, the same numbers fail validation, by name.
    let s = MaskShape::new(1, 1, 63, 63);
    for (m, want) in [
        (Mask::natten(7, 9, 4), "KERNEL must be odd"),
        (Mask::natten_dilated(7, 9, 3, 3), "exceeds HEIGHT 7"),
        (Mask::swin(7, 9, 3, 0), "WINDOW 3 must divide HEIGHT 7"),
        (Mask::swin(9, 7, 3, 0), "WINDOW 3 must divide WIDTH 7"),
        (Mask::chunked(0, None), "at least 1"),
    ] {
        match BlockMask::new(&(Mask::causal() & m.clone()), s) {
            Err(AttnError::Mask(e)) => assert!(e.contains(want), "{m}: {e}"),
            other => panic!("{m}: expected a mask error, got {:?}", other.map(|_| ())),
        }
    }
    // A grid that is not L_k positions is an error naming the shape (as `neighbourhood`).
    for (m, want) in [
        (
            Mask::natten(7, 9, 3),
            "a 7 x 9 natten grid needs L_k = 63, not 64",
        ),
        (
            Mask::swin(8, 8, 4, 2),
            "a 8 x 8 swin grid needs L_k = 64, not 63",
        ),
    ] {
        let lk = if want.ends_with("64") { 64 } else { 63 };
        match BlockMask::new(&m, MaskShape::new(1, 1, 10, lk)) {
            Err(AttnError::Mask(e)) => assert!(e.contains(want), "{m}: {e}"),
            other => panic!("{m}: expected a mask error, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn the_grammar_spells_them_and_reads_them_back() {
    for (text, mask) in [
        ("natten(7,9,3)", Mask::natten(7, 9, 3)),
        ("natten(7,9,3,2)", Mask::natten_dilated(7, 9, 3, 2)),
        ("swin(8,12,4,2)", Mask::swin(8, 12, 4, 2)),
        ("chunked(16)", Mask::chunked(16, None)),
        ("chunked(16,2)", Mask::chunked(16, Some(2))),
    ] {
        assert_eq!(mask.to_string(), text);
        assert!(text.parse::<Mask>().unwrap() == mask, "{text}");
    }
    // Dilation 1 is NATTEN without dilation, and prints so.
    assert_eq!(
        "natten(7, 9, 3, 1)".parse::<Mask>().unwrap().to_string(),
        "natten(7,9,3)"
    );
    assert!(Mask::chunked(4, None) != Mask::chunked(4, Some(usize::MAX)));
    assert!(Mask::chunked(4, Some(1)) != Mask::chunked(4, Some(2)));
    assert!(Mask::swin(8, 8, 4, 0) != Mask::swin(8, 8, 4, 2));
}
