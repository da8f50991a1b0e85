//! Block masks: a mask compiled once per shape into one class per (query tile, key tile),
//! plus a bitmap for each `Partial` tile. This is what lets a mask that hides most pairs
//! save most of the work: kernels skip `Empty` tiles outright and never test `Full` ones.

use std::ops::Range;

use rayon::prelude::*;

use crate::classify::{Classifier, Grid, TileClass};
use crate::error::{AttnError, Result};
use crate::mask::{Mask, MaskShape};

/// Default tile sizes (rows of queries × columns of keys).
pub const DEFAULT_TILE_Q: usize = 64;
pub const DEFAULT_TILE_K: usize = 64;

/// One compiled tile as a kernel reads it from a [`BlockMask`]: its class *and*, for a
/// partial tile, the bitmap of allowed pairs. (The class alone, as the analytic classifier
/// answers it before any bitmap exists, is [`TileClass`](crate::TileClass).)
#[derive(Clone, Copy, Debug)]
pub enum Tile<'a> {
    Empty,
    Full,
    /// `tile_q` rows of `words` `u64`s: bit `c % 64` of word `c / 64` of row `r` says whether
    /// the pair (tile row `r`, tile column `c`) is allowed.
    Partial(&'a [u64]),
}

/// Counts that say how much a block mask saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Tiles over all batch rows and heads.
    pub tiles: u64,
    pub empty: u64,
    pub full: u64,
    pub partial: u64,
    /// Allowed (query, key) pairs over all batch rows and heads.
    pub allowed_pairs: u64,
    /// `B · H · L_q · L_k`.
    pub total_pairs: u64,
}

impl BlockStats {
    /// Fraction of tiles the kernels skip.
    pub fn skipped_tile_fraction(&self) -> f64 {
        self.empty as f64 / self.tiles.max(1) as f64
    }

    /// Fraction of (query, key) pairs the mask hides.
    pub fn hidden_pair_fraction(&self) -> f64 {
        1.0 - self.allowed_pairs as f64 / self.total_pairs.max(1) as f64
    }
}

/// A mask compiled for one shape and one tile size.
#[derive(Clone, Debug)]
pub struct BlockMask {
    /// The problem the kernels see: the block's (`global` itself unless built by
    /// [`BlockMask::new_block`]).
    shape: MaskShape,
    /// The whole problem the mask is evaluated over, and the block's first query and key.
    global: MaskShape,
    q0: usize,
    k0: usize,
    tile_q: usize,
    tile_k: usize,
    nq: usize,
    nk: usize,
    /// 1 when the mask is the same for every batch row (or head), else B (or H).
    rows_b: usize,
    rows_h: usize,
    /// `[rows_b, rows_h, nq, nk]`: `EMPTY`, `FULL`, or the index of the tile's bitmap.
    tiles: Vec<u32>,
    words: usize,
    bits: Vec<u64>,
    stats: BlockStats,
}

const EMPTY: u32 = u32::MAX;
const FULL: u32 = u32::MAX - 1;

/// What one tile compiles to: its class, and its bitmap and allowed count when partial.
struct Compiled {
    class: TileClass,
    bits: Vec<u64>,
    allowed: u64,
}

impl BlockMask {
    /// Compiles `mask` for `shape` with the default tile sizes.
    pub fn new(mask: &Mask, shape: MaskShape) -> Result<Self> {
        Self::with_tiles(mask, shape, DEFAULT_TILE_Q, DEFAULT_TILE_K)
    }

    pub fn with_tiles(mask: &Mask, shape: MaskShape, tile_q: usize, tile_k: usize) -> Result<Self> {
        Self::block_with_tiles(mask, shape, 0..shape.lq, 0..shape.lk, (tile_q, tile_k))
    }

    /// Compiles `mask` for one block of a larger problem: the queries `q_range` and keys
    /// `k_range` of the whole problem `global` (context parallelism: one process holds one
    /// block of the sequence). The mask is evaluated at the global positions
    /// `(q_range.start + i, k_range.start + j)` — document ids, padding lengths, windows,
    /// bottom-right alignment through the *global* `L_k − L_q` — while the block mask, and the
    /// kernels it is handed to, see a local `len(q_range) × len(k_range)` problem:
    /// [`shape`](Self::shape) is `(B, H, len(q_range), len(k_range))`. Tiles start at the
    /// block's corner, so offsets need not be multiples of the tile size.
    ///
    /// Score modifiers follow: ALiBi and T5 relative positions take the whole problem's
    /// `j − i'`, and dropout its pattern, on such a block mask.
    ///
    /// A block whose pairs the mask hides entirely has [`all_empty`](Self::all_empty): the
    /// caller can skip its forward and backward (they would return `LSE = −∞`, zero
    /// gradients) and need not send its keys and values. Ranges outside `global` are an
    /// [`AttnError::BlockRange`].
    pub fn new_block(
        mask: &Mask,
        global: MaskShape,
        q_range: Range<usize>,
        k_range: Range<usize>,
    ) -> Result<Self> {
        Self::block_with_tiles(
            mask,
            global,
            q_range,
            k_range,
            (DEFAULT_TILE_Q, DEFAULT_TILE_K),
        )
    }

    /// [`new_block`](Self::new_block) with tile sizes of the caller's choice.
    pub fn block_with_tiles(
        mask: &Mask,
        global: MaskShape,
        q_range: Range<usize>,
        k_range: Range<usize>,
        (tile_q, tile_k): (usize, usize),
    ) -> Result<Self> {
        if tile_q == 0 || tile_k == 0 {
            return Err(AttnError::BadTiles { tile_q, tile_k });
        }
        mask.validate(&global)?;
        for (what, r, len) in [
            ("q_range", &q_range, global.lq),
            ("k_range", &k_range, global.lk),
        ] {
            if r.start > r.end || r.end > len {
                return Err(AttnError::BlockRange {
                    what,
                    start: r.start,
                    end: r.end,
                    len,
                });
            }
        }
        let shape = MaskShape::new(global.batch, global.heads, q_range.len(), k_range.len());
        // A tile larger than the sequence is the whole sequence; clamping keeps the bitmaps
        // (`tile_q · words` per partial tile) and the kernels' scratch at the sequence's size.
        let (tile_q, tile_k) = (tile_q.min(shape.lq.max(1)), tile_k.min(shape.lk.max(1)));
        let grid = Grid {
            shape: global,
            q0: q_range.start,
            k0: k_range.start,
            lq: shape.lq,
            lk: shape.lk,
            tile_q,
            tile_k,
            nq: shape.lq.div_ceil(tile_q),
            nk: shape.lk.div_ceil(tile_k),
        };
        let rows_b = if mask.varies_with_batch() {
            shape.batch
        } else {
            1
        };
        let rows_h = if mask.varies_with_head() {
            shape.heads
        } else {
            1
        };
        let words = tile_k.div_ceil(64);
        let too_large = |what, factors: &[usize]| AttnError::SizeOverflow {
            name: "block mask",
            what,
            factors: factors.to_vec(),
        };
        let product = |what, factors: &[usize]| {
            factors
                .iter()
                .try_fold(1usize, |n, &x| n.checked_mul(x))
                .ok_or_else(|| too_large(what, factors))
        };
        let pairs = [shape.batch, shape.heads, shape.lq, shape.lk];
        let total_pairs = u64::try_from(product("pairs B · H · L_q · L_k", &pairs)?)
            .map_err(|_| too_large("pairs B · H · L_q · L_k", &pairs))?;
        let dims = [rows_b, rows_h, grid.nq, grid.nk];
        let n_tiles = product("tiles", &dims)?;
        product("bitmap words per tile", &[tile_q, words])?;
        // Reserve the tile table before any work, so that a table no memory can hold is an
        // error rather than an abort halfway through compiling.
        let mut tiles: Vec<u32> = Vec::new();
        tiles
            .try_reserve_exact(n_tiles)
            .map_err(|_| too_large("tiles", &dims))?;
        let classifier = Classifier::build(mask, &grid);

        // One task per (batch row, head, query tile); each returns its row of tiles.
        let rows: Vec<Vec<Compiled>> = (0..rows_b * rows_h * grid.nq)
            .into_par_iter()
            .map(|task| {
                let (bh, qt) = (task / grid.nq, task % grid.nq);
                let (b, h) = (bh / rows_h, bh % rows_h);
                (0..grid.nk)
                    .map(|kt| compile_tile(mask, (&classifier, &grid, words), (b, h, qt, kt)))
                    .collect()
            })
            .collect();

        Self::assemble(
            (shape, global, grid.q0, grid.k0),
            (tile_q, tile_k, grid.nq, grid.nk, words),
            (rows_b, rows_h),
            tiles,
            total_pairs,
            rows.into_iter().flatten(),
        )
    }

    /// A block mask from tile classes decided outside the kernel crate (the Python package
    /// evaluates a user's `mask_mod` tile by tile and sends only what it found): `classes`
    /// is `[rows_b, rows_h, nq, nk]` (`nq = ⌈L_q / tile_q⌉`, `nk = ⌈L_k / tile_k⌉`; `rows_b`
    /// is 1 or `B`, `rows_h` 1 or `H`), and `partial` holds `tile_q × tile_k` booleans
    /// (`true` = may attend, row-major) for each `Partial` class in order. Entries past the
    /// sequence's end in a last tile are ignored. A `Partial` tile whose booleans are all
    /// `true` (or all `false`) is stored as `Full` (`Empty`), as [`BlockMask::new`] does.
    /// The tiles are taken as given: [`BlockMask::with_tiles`] clamps a tile larger than the
    /// sequence to it, so pass clamped sizes for the same block mask. Wrong sizes are an
    /// [`AttnError::ShapeMismatch`] naming what is wrong.
    pub fn from_tiles(
        shape: MaskShape,
        (tile_q, tile_k): (usize, usize),
        (rows_b, rows_h): (usize, usize),
        classes: &[TileClass],
        partial: &[bool],
    ) -> Result<Self> {
        if tile_q == 0 || tile_k == 0 {
            return Err(AttnError::BadTiles { tile_q, tile_k });
        }
        let bad = |what: String| Err(AttnError::ShapeMismatch { what });
        if rows_b != 1 && rows_b != shape.batch {
            return bad(format!(
                "tile table batch rows {rows_b}: must be 1 or B = {}",
                shape.batch
            ));
        }
        if rows_h != 1 && rows_h != shape.heads {
            return bad(format!(
                "tile table heads {rows_h}: must be 1 or H = {}",
                shape.heads
            ));
        }
        let (nq, nk) = (shape.lq.div_ceil(tile_q), shape.lk.div_ceil(tile_k));
        let too_large = |what, factors: &[usize]| AttnError::SizeOverflow {
            name: "block mask",
            what,
            factors: factors.to_vec(),
        };
        let dims = [rows_b, rows_h, nq, nk];
        let n_tiles = dims
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .ok_or_else(|| too_large("tiles", &dims))?;
        if classes.len() != n_tiles {
            return bad(format!(
                "tile classes: {} given for [rows_b, rows_h, nq, nk] = {dims:?} ({n_tiles})",
                classes.len()
            ));
        }
        let area = tile_q
            .checked_mul(tile_k)
            .ok_or_else(|| too_large("tile area", &[tile_q, tile_k]))?;
        let n_partial = classes.iter().filter(|&&c| c == TileClass::Partial).count();
        if Some(partial.len()) != n_partial.checked_mul(area) {
            return bad(format!(
                "partial tiles: {} booleans given for {n_partial} partial tiles of {tile_q} x {tile_k}",
                partial.len()
            ));
        }
        let pairs = [shape.batch, shape.heads, shape.lq, shape.lk];
        let total_pairs = pairs
            .iter()
            .try_fold(1u64, |n, &x| n.checked_mul(x as u64))
            .ok_or_else(|| too_large("pairs B · H · L_q · L_k", &pairs))?;
        let grid = Grid {
            shape,
            q0: 0,
            k0: 0,
            lq: shape.lq,
            lk: shape.lk,
            tile_q,
            tile_k,
            nq,
            nk,
        };
        let words = tile_k.div_ceil(64);
        let mut tiles: Vec<u32> = Vec::new();
        tiles
            .try_reserve_exact(n_tiles)
            .map_err(|_| too_large("tiles", &dims))?;
        let mut next = partial.chunks_exact(area);
        let compiled = classes.iter().enumerate().map(|(n, &class)| {
            let kt = n % nk;
            let qt = (n / nk) % nq;
            let r = grid.rect(qt, kt);
            let (rows, cols) = (r.i1 - r.i0, r.j1 - r.j0);
            match class {
                TileClass::Empty => Compiled::uniform(class, 0),
                TileClass::Full => Compiled::uniform(class, (rows * cols) as u64),
                TileClass::Partial => {
                    let given = next.next().expect("counted above");
                    let mut bits = vec![0u64; tile_q * words];
                    let mut allowed = 0u64;
                    for i in 0..rows {
                        let row = &mut bits[i * words..(i + 1) * words];
                        for (c, _) in given[i * tile_k..i * tile_k + cols]
                            .iter()
                            .enumerate()
                            .filter(|(_, &x)| x)
                        {
                            row[c / 64] |= 1 << (c % 64);
                            allowed += 1;
                        }
                    }
                    Compiled::settled(bits, allowed, (rows * cols) as u64)
                }
            }
        });
        Self::assemble(
            (shape, shape, 0, 0),
            (tile_q, tile_k, nq, nk, words),
            (rows_b, rows_h),
            tiles,
            total_pairs,
            compiled,
        )
    }

    /// The block mask from its compiled tiles, in `[rows_b, rows_h, nq, nk]` order.
    fn assemble(
        (shape, global, q0, k0): (MaskShape, MaskShape, usize, usize),
        (tile_q, tile_k, nq, nk, words): (usize, usize, usize, usize, usize),
        (rows_b, rows_h): (usize, usize),
        mut tiles: Vec<u32>,
        total_pairs: u64,
        compiled: impl Iterator<Item = Compiled>,
    ) -> Result<Self> {
        let repeat = ((shape.batch / rows_b) * (shape.heads / rows_h)) as u64;
        let mut stats = BlockStats {
            total_pairs,
            ..Default::default()
        };
        let mut bits = Vec::new();
        for c in compiled {
            stats.tiles += repeat;
            stats.allowed_pairs += repeat * c.allowed;
            tiles.push(match c.class {
                TileClass::Empty => {
                    stats.empty += repeat;
                    EMPTY
                }
                TileClass::Full => {
                    stats.full += repeat;
                    FULL
                }
                TileClass::Partial => {
                    stats.partial += repeat;
                    let index = bits.len() / (tile_q * words);
                    bits.extend_from_slice(&c.bits);
                    u32::try_from(index)
                        .ok()
                        .filter(|&x| x < FULL)
                        .ok_or(AttnError::TooManyPartialTiles { max: FULL as usize })?
                }
            });
        }
        Ok(BlockMask {
            shape,
            global,
            q0,
            k0,
            tile_q,
            tile_k,
            nq,
            nk,
            rows_b,
            rows_h,
            tiles,
            words,
            bits,
            stats,
        })
    }

    pub fn shape(&self) -> MaskShape {
        self.shape
    }

    /// The whole problem the mask was evaluated over ([`shape`](Self::shape) unless this is
    /// one block of it).
    pub fn global_shape(&self) -> MaskShape {
        self.global
    }

    /// The block's first query and first key in the whole problem (`(0, 0)` for a block mask
    /// of the whole problem).
    pub fn offsets(&self) -> (usize, usize) {
        (self.q0, self.k0)
    }

    /// What a block adds to a local `j − i'` (`i' = i + L_k − L_q`, local lengths) to make it
    /// the whole problem's `j − i'` at the same pair: `(k0 − q0) − (L_k − L_q)_global +
    /// (L_k − L_q)_local`; 0 for the whole problem. The positional score terms (ALiBi, T5
    /// buckets) and their gradients read their offsets through it.
    pub(crate) fn position_shift(&self) -> i64 {
        (self.k0 as i64 - self.q0 as i64) - self.global.bottom_right_offset()
            + self.shape.bottom_right_offset()
    }

    /// Whether this is a block of a larger problem rather than the whole of it.
    pub fn is_block(&self) -> bool {
        self.shape != self.global
    }

    /// Whether every tile is empty (for every batch row and head): the mask hides every pair,
    /// so a kernel call would do no work and return `LSE = −∞` (or the sink) and zero
    /// gradients. A context-parallel caller skips such a block, and does not send it.
    pub fn all_empty(&self) -> bool {
        self.stats.empty == self.stats.tiles
    }

    pub fn tile_q(&self) -> usize {
        self.tile_q
    }

    pub fn tile_k(&self) -> usize {
        self.tile_k
    }

    /// Number of query tiles and key tiles.
    pub fn grid(&self) -> (usize, usize) {
        (self.nq, self.nk)
    }

    /// `u64` words per bitmap row of a partial tile.
    pub fn words(&self) -> usize {
        self.words
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    #[inline]
    fn index(&self, b: usize, h: usize, qt: usize, kt: usize) -> u32 {
        let b = if self.rows_b == 1 { 0 } else { b };
        let h = if self.rows_h == 1 { 0 } else { h };
        self.tiles[((b * self.rows_h + h) * self.nq + qt) * self.nk + kt]
    }

    #[inline]
    pub fn tile(&self, b: usize, h: usize, qt: usize, kt: usize) -> Tile<'_> {
        match self.index(b, h, qt, kt) {
            EMPTY => Tile::Empty,
            FULL => Tile::Full,
            p => {
                let n = self.tile_q * self.words;
                let start = p as usize * n;
                Tile::Partial(&self.bits[start..start + n])
            }
        }
    }

    pub fn class(&self, b: usize, h: usize, qt: usize, kt: usize) -> TileClass {
        match self.tile(b, h, qt, kt) {
            Tile::Empty => TileClass::Empty,
            Tile::Full => TileClass::Full,
            Tile::Partial(_) => TileClass::Partial,
        }
    }

    /// Checks that this block mask was compiled for `shape`.
    pub(crate) fn check_shape(&self, shape: MaskShape) -> Result<()> {
        if self.shape != shape {
            return Err(AttnError::BlockMaskShape {
                compiled: self.shape,
                call: shape,
            });
        }
        Ok(())
    }
}

impl Compiled {
    fn uniform(class: TileClass, allowed: u64) -> Self {
        Compiled {
            class,
            bits: Vec::new(),
            allowed,
        }
    }

    /// A scanned tile's bitmap, `allowed` of its `area` pairs set: a tile that turns out
    /// all hidden or all allowed is stored as `Empty` or `Full`, without its bitmap.
    fn settled(bits: Vec<u64>, allowed: u64, area: u64) -> Self {
        match allowed {
            0 => Self::uniform(TileClass::Empty, 0),
            a if a == area => Self::uniform(TileClass::Full, area),
            _ => Compiled {
                class: TileClass::Partial,
                bits,
                allowed,
            },
        }
    }
}

/// One tile `(b, h, query tile, key tile)` of the grid: its class and, if partial, bitmap.
fn compile_tile(
    mask: &Mask,
    (classifier, g, words): (&Classifier, &Grid, usize),
    (b, h, qt, kt): (usize, usize, usize, usize),
) -> Compiled {
    let r = g.rect(qt, kt);
    let area = ((r.i1 - r.i0) * (r.j1 - r.j0)) as u64;
    let class = classifier.class(g, b, h, qt, kt);
    if class != TileClass::Partial {
        return Compiled::uniform(class, if class == TileClass::Full { area } else { 0 });
    }
    let mut bits = vec![0u64; g.tile_q * words];
    let mut allowed = 0u64;
    for i in r.i0..r.i1 {
        let row = &mut bits[(i - r.i0) * words..(i - r.i0 + 1) * words];
        for j in r.j0..r.j1 {
            if mask.allowed(&g.shape, b, h, i, j) {
                let c = j - r.j0;
                row[c / 64] |= 1 << (c % 64);
                allowed += 1;
            }
        }
    }
    // Composite masks can be classified Partial when they are not; the scan settles it.
    Compiled::settled(bits, allowed, area)
}
