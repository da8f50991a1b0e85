//! The tile model against a scalar definition of each instruction (partial tiles
//! included), and the AMX kernel against exact products, through the model on every
//! x86-64 CPU and through the hardware where the CPU has AMX (else SKIPPED).

use super::hardware::{self, Hardware};
use super::kernel;
use super::model::Model;
use super::tile::{TileConfig, TileUnit, ROWS};
use crate::gemm::bf16::Pairs;
use crate::gemm::{MatMut, Update};
use crate::rng::SplitMix64;

fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Says whether the hardware runs too; `false` with a SKIPPED line where it cannot.
fn hardware_too(test: &str) -> bool {
    let ok = hardware::available();
    if ok {
        report(&format!("{test}: ran the AMX model and the AMX hardware"));
    } else {
        report(&format!(
            "{test}: ran the AMX model; SKIPPED amx hardware (this CPU lacks AMX)"
        ));
    }
    ok
}

/// A configuration with tile `t` `shapes[t] = (rows, colsb)`.
fn config(shapes: &[(usize, usize)]) -> TileConfig {
    let mut c = TileConfig::uniform(0, 0);
    for (t, &(r, cb)) in shapes.iter().enumerate() {
        c.rows[t] = r as u8;
        c.colsb[t] = cb as u16;
    }
    assert!(c.valid());
    c
}

/// A random bf16 (bits), mostly of moderate size, sometimes zero or denormal.
fn bf16_bits(rng: &mut SplitMix64) -> u16 {
    let r = rng.next_u64();
    match r % 16 {
        0 => 0,
        1 => (r >> 8) as u16 & 0x807f, // exponent 0: ±denormal (or ±0)
        _ => half::bf16::from_f32((rng.unit() * 4.0 - 2.0) as f32).to_bits(),
    }
}

/// Loads `src` (16 rows `stride` apart) into tile 3 shaped `rows × colsb` and stores it
/// into a sentinel-filled buffer (16 rows `dst_stride` apart), which it returns.
///
/// # Safety
/// `unit` runs; `src` holds 16 rows of `stride ≥ colsb` bytes.
unsafe fn load_store<U: TileUnit>(
    unit: &mut U,
    src: &[u8],
    stride: usize,
    (rows, colsb): (usize, usize),
    dst_stride: usize,
) -> Vec<u8> {
    let mut dst = vec![0xa5u8; ROWS * dst_stride];
    // SAFETY: the contract; `dst` holds 16 rows of `dst_stride ≥ colsb` bytes.
    unsafe {
        unit.configure(&config(&[(rows, colsb); 8]));
        unit.load(3, src.as_ptr(), stride);
        unit.store(3, dst.as_mut_ptr(), dst_stride);
        unit.release();
    }
    dst
}

#[test]
fn load_and_store_move_exactly_the_configured_bytes() {
    let hw = hardware_too("load_and_store_move_exactly_the_configured_bytes");
    let mut rng = SplitMix64::new(1);
    let (stride, dst_stride) = (100, 72);
    let src: Vec<u8> = (0..ROWS * stride).map(|_| rng.next_u64() as u8).collect();
    for (rows, colsb) in [(16, 64), (5, 64), (16, 20), (3, 8), (1, 4), (16, 1)] {
        let mut m = Model::new();
        // SAFETY: `src` holds 16 rows of `stride ≥ colsb` bytes.
        unsafe {
            m.configure(&config(&[(rows, colsb); 8]));
            m.load(3, src.as_ptr(), stride);
        }
        for (r, row) in m.bytes(3).iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                let want = if r < rows && c < colsb {
                    src[r * stride + c]
                } else {
                    0
                };
                assert_eq!(x, want, "tile {rows}×{colsb}: byte ({r}, {c})");
            }
        }
        // SAFETY: touches the model's tiles only.
        unsafe { m.zero(3) };
        assert!(m.bytes(3).iter().flatten().all(|&x| x == 0));
        let mut units: Vec<(&str, Vec<u8>)> = Vec::new();
        // SAFETY: `src` as above; the hardware only where it is available.
        unsafe {
            units.push((
                "model",
                load_store(&mut Model::new(), &src, stride, (rows, colsb), dst_stride),
            ));
            if hw {
                units.push((
                    "hardware",
                    load_store(&mut Hardware, &src, stride, (rows, colsb), dst_stride),
                ));
            }
        }
        for (what, dst) in units {
            for (i, &x) in dst.iter().enumerate() {
                let (r, c) = (i / dst_stride, i % dst_stride);
                let want = if r < rows && c < colsb {
                    src[r * stride + c]
                } else {
                    0xa5
                };
                assert_eq!(x, want, "{what}: store {rows}×{colsb}: byte ({r}, {c})");
            }
        }
    }
}

/// The scalar definition of `tdpbf16ps` (Intel SDM pseudo-code) on natural-order matrices:
/// `C[i][j] += Σ_k A[i][k]·B[k][j]`, `k` ascending over the bf16 of each pair, B's entry
/// `(k, j)` the half `k % 2` of VNNI word `(k / 2, j)`; denormal inputs read as zero and
/// denormal sums become zero.
fn tdpbf16ps_definition(c: &mut [f32], a: &[u32], b: &[u32], (m, kp, n): (usize, usize, usize)) {
    let daz = |x: f32| {
        if x.is_subnormal() {
            0.0f32.copysign(x)
        } else {
            x
        }
    };
    let half = |w: u32, h: usize| daz(f32::from_bits((w >> (16 * h)) << 16));
    for i in 0..m {
        for j in 0..n {
            let mut acc = daz(c[i * n + j]);
            for k in 0..2 * kp {
                let x = half(a[i * kp + k / 2], k % 2) * half(b[(k / 2) * n + j], k % 2);
                acc = daz(acc + x);
            }
            c[i * n + j] = acc;
        }
    }
}

/// One `tdpbf16ps` on `unit`: `C [m × n] += A [m × kp pairs] · B [kp × n pairs]` in
/// tiles 0, 4 and 6 (within the kernel's plan, which `Hardware` is written for).
///
/// # Safety
/// `unit` runs; the operands hold `m·n`, `m·kp`, `kp·n` values.
unsafe fn one_dp<U: TileUnit>(
    unit: &mut U,
    c: &[f32],
    a: &[u32],
    b: &[u32],
    (m, kp, n): (usize, usize, usize),
) -> Vec<f32> {
    let mut shapes = [(0, 0); 8];
    (shapes[0], shapes[4], shapes[6]) = ((m, 4 * n), (m, 4 * kp), (kp, 4 * n));
    let mut got = vec![0f32; m * n];
    // SAFETY: each operand holds its tile's rows × colsb bytes at the strides given.
    unsafe {
        unit.configure(&config(&shapes));
        unit.load(0, c.as_ptr().cast(), 4 * n);
        unit.load(4, a.as_ptr().cast(), 4 * kp);
        unit.load(6, b.as_ptr().cast(), 4 * n);
        unit.dpbf16ps(0, 4, 6);
        unit.store(0, got.as_mut_ptr().cast(), 4 * n);
    }
    got
}

#[test]
fn tdpbf16ps_matches_its_definition_on_partial_tiles() {
    let hw = hardware_too("tdpbf16ps_matches_its_definition_on_partial_tiles");
    let mut rng = SplitMix64::new(2);
    let (mut entries, mut differ) = (0, 0);
    for (m, kp, n) in [
        (16, 16, 16),
        (1, 1, 1),
        (7, 3, 16),
        (16, 5, 9),
        (3, 16, 2),
        (9, 11, 13),
    ] {
        let pair = |rng: &mut SplitMix64| bf16_bits(rng) as u32 | (bf16_bits(rng) as u32) << 16;
        let a: Vec<u32> = (0..m * kp).map(|_| pair(&mut rng)).collect();
        let b: Vec<u32> = (0..kp * n).map(|_| pair(&mut rng)).collect();
        let mut c: Vec<f32> = (0..m * n).map(|_| rng.unit() as f32 - 0.5).collect();
        c[0] = f32::from_bits(3); // a denormal accumulator reads as zero
        let mut want = c.clone();
        tdpbf16ps_definition(&mut want, &a, &b, (m, kp, n));
        let mut model = Model::new();
        // SAFETY: the model runs anywhere; operands sized as `one_dp` asks.
        let got = unsafe { one_dp(&mut model, &c, &a, &b, (m, kp, n)) };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "({m}, {kp}, {n}) entry {i}: {g} vs {w}"
            );
        }
        // What the instruction zeroes: rows past M, bytes past N columns.
        for (r, row) in model.bytes(0).iter().enumerate() {
            assert!(row[if r < m { 4 * n } else { 0 }..].iter().all(|&x| x == 0));
        }
        if hw {
            // SAFETY: the hardware is available; operands as above.
            let real = unsafe { one_dp(&mut Hardware, &c, &a, &b, (m, kp, n)) };
            // Within f32 summation error of the definition (bits: reported below): each
            // of the 2·kp additions rounds by at most half an ulp of the running size.
            let w = |x: u32, h: usize| half::bf16::from_bits((x >> (16 * h)) as u16).to_f64();
            for (i, (g, d)) in real.iter().zip(&want).enumerate() {
                let (r, j) = (i / n, i % n);
                let size = c[i].abs() as f64
                    + (0..2 * kp)
                        .map(|k| (w(a[r * kp + k / 2], k % 2) * w(b[k / 2 * n + j], k % 2)).abs())
                        .sum::<f64>();
                let bound = (2 * kp + 1) as f64 * size * f32::EPSILON as f64 + 1e-37;
                assert!(
                    ((g - d) as f64).abs() <= bound,
                    "hardware ({m}, {kp}, {n}) entry {i}: {g} vs {d}"
                );
            }
            entries += real.len();
            differ += real
                .iter()
                .zip(&want)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
        }
    }
    if hw {
        report(&format!(
            "tdpbf16ps_matches_its_definition_on_partial_tiles: the hardware's bits differ \
             from the definition in {differ} of {entries} entries"
        ));
    }
}

#[test]
fn tdpbf16ps_flushes_denormals() {
    let bf = |x: f32| half::bf16::from_f32(x).to_bits() as u32;
    let run = |c: f32, a: u32, b: u32| {
        let mut model = Model::new();
        let mut out = [c];
        // SAFETY: 1 × 1 tiles on one-element operands.
        unsafe {
            model.configure(&config(&[(1, 4), (1, 4), (1, 4)]));
            model.load(0, out.as_ptr().cast(), 4);
            model.load(1, [a].as_ptr().cast(), 4);
            model.load(2, [b].as_ptr().cast(), 4);
            model.dpbf16ps(0, 1, 2);
            model.store(0, out.as_mut_ptr().cast(), 4);
        }
        out[0]
    };
    // A denormal bf16 input counts as 0 (else 2^-133 · 2^100 = 2^-33).
    assert_eq!(run(0.0, 0x0001, bf(2f32.powi(100))).to_bits(), 0);
    // A sum below 2^-126 becomes 0: 2^-126 − 2^-127 = 2^-127.
    let (x, y) = (bf(2f32.powi(-63)), bf(-(2f32.powi(-64))));
    assert_eq!(run(f32::MIN_POSITIVE, x, y).to_bits(), 0);
    // Both halves of a pair count, low first: 1·3 + 2·5.
    assert_eq!(
        run(0.5, bf(1.0) | bf(2.0) << 16, bf(3.0) | bf(5.0) << 16),
        13.5
    );
}

#[test]
#[should_panic(expected = "#UD")]
fn tdpbf16ps_on_disagreeing_shapes_is_refused() {
    let mut model = Model::new();
    // SAFETY: touches the model's tiles only.
    unsafe {
        model.configure(&config(&[(4, 64), (4, 32), (4, 64)])); // A has 8 pairs, B 4 rows
        model.dpbf16ps(0, 1, 2);
    }
}

#[test]
#[should_panic(expected = "#UD")]
fn tiles_before_ldtilecfg_are_refused() {
    // SAFETY: touches the model's tiles only.
    unsafe { Model::new().zero(0) };
}

/// One random product `C (+)= A·B` with strides past the widths and sentinels between
/// rows: `(m, n, kp)`, `n` whole tiles.
struct Product {
    m: usize,
    n: usize,
    kp: usize,
    a: Vec<u32>,
    lda: usize,
    b: Vec<u32>,
    ldb: usize,
    c: Vec<f32>,
    ldc: usize,
}

const SENTINEL: f32 = 12345.0;

impl Product {
    fn new(rng: &mut SplitMix64, (m, n, kp): (usize, usize, usize)) -> Self {
        let (lda, ldb, ldc) = (kp + 3, n + 5, n + 2);
        let pair = |rng: &mut SplitMix64| {
            let h = |rng: &mut SplitMix64| half::bf16::from_f32(rng.unit() as f32 - 0.5).to_bits();
            h(rng) as u32 | (h(rng) as u32) << 16
        };
        let a = (0..m * lda).map(|_| pair(rng)).collect();
        let b = (0..kp * ldb).map(|_| pair(rng)).collect();
        let c = (0..m * ldc)
            .map(|i| {
                if i % ldc < n {
                    rng.unit() as f32
                } else {
                    SENTINEL
                }
            })
            .collect();
        Product {
            m,
            n,
            kp,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
        }
    }

    fn run<U: TileUnit>(&self, unit: &mut U, update: Update) -> Vec<f32> {
        let mut c = self.c.clone();
        let (a, b) = (
            Pairs::of_u32(&self.a, self.m, self.kp, self.lda),
            Pairs::of_u32(&self.b, self.kp, self.n, self.ldb),
        );
        // SAFETY: the unit runs (the callers check `hardware::available()`); operands
        // checked as they were made.
        unsafe {
            kernel::gemm(
                unit,
                MatMut::new(&mut c, self.m, self.n, self.ldc),
                a,
                b,
                update,
            )
        };
        c
    }

    /// Asserts `got` is `C (+)= A·B` within f32 summation error, and the sentinels kept.
    fn check(&self, got: &[f32], update: Update, what: &str) {
        let w = |x: u32| half::bf16::from_bits(x as u16).to_f64();
        for i in 0..self.m {
            for j in 0..self.ldc {
                let g = got[i * self.ldc + j];
                if j >= self.n {
                    assert_eq!(g, SENTINEL, "{what}: wrote outside C at ({i}, {j})");
                    continue;
                }
                let c0 = if update == Update::Add {
                    self.c[i * self.ldc + j] as f64
                } else {
                    0.0
                };
                let (mut exact, mut size) = (c0, c0.abs());
                for p in 0..self.kp {
                    let (x, y) = (self.a[i * self.lda + p], self.b[p * self.ldb + j]);
                    for t in [w(x) * w(y), w(x >> 16) * w(y >> 16)] {
                        exact += t;
                        size += t.abs();
                    }
                }
                let bound = (2 * self.kp + 2) as f64 * size * f32::EPSILON as f64 / 2.0;
                assert!(
                    (g as f64 - exact).abs() <= bound,
                    "{what} ({}, {}, {}): C[{i}][{j}] = {g}, exact {exact}",
                    self.m,
                    self.n,
                    self.kp
                );
            }
        }
    }
}

const SHAPES: [(usize, usize, usize); 10] = [
    (16, 16, 16),
    (64, 64, 32),
    (1, 16, 1),
    (5, 48, 7),
    (17, 32, 16),
    (33, 80, 40),
    (16, 16, 0),
    (31, 16, 17),
    (40, 64, 8),
    (2, 112, 33),
];

#[test]
fn amx_kernel_computes_the_products() {
    let hw = hardware_too("amx_kernel_computes_the_products");
    let mut rng = SplitMix64::new(3);
    let (mut entries, mut differ) = (0, 0);
    for shape in SHAPES {
        let p = Product::new(&mut rng, shape);
        for update in [Update::Set, Update::Add] {
            let model = p.run(&mut Model::new(), update);
            p.check(&model, update, "model");
            if hw {
                let real = p.run(&mut Hardware, update);
                p.check(&real, update, "hardware");
                entries += real.len();
                differ += real
                    .iter()
                    .zip(&model)
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
            }
        }
    }
    if hw {
        // Not asserted: the SDM's pseudo-code fixes the order, but nothing has yet shown
        // that the silicon rounds each step as the model does; both meet the bound above.
        report(&format!(
            "amx_kernel_computes_the_products: hardware and model differ in {differ} of \
             {entries} entries (bits)"
        ));
    }
}

/// Products inside one [`kernel::Configured`] (as a forward task runs them): the same
/// bits as products configured one by one, the tiles configured throughout and released
/// when it is dropped, also when a panic unwinds through it.
#[test]
fn configured_tiles_serve_many_products_and_are_released_on_drop() {
    report("configured_tiles_serve_many_products_and_are_released_on_drop: ran the AMX model");
    let mut rng = SplitMix64::new(4);
    let products: Vec<Product> = SHAPES.iter().map(|&s| Product::new(&mut rng, s)).collect();
    let mut model = Model::new();
    {
        // SAFETY: the model runs anywhere.
        let mut tiles = unsafe { kernel::Configured::new(&mut model) };
        for (p, update) in products
            .iter()
            .zip([Update::Set, Update::Add].iter().cycle())
        {
            let mut c = p.c.clone();
            let (a, b) = (
                Pairs::of_u32(&p.a, p.m, p.kp, p.lda),
                Pairs::of_u32(&p.b, p.kp, p.n, p.ldb),
            );
            // SAFETY: operands checked as they were made.
            unsafe { tiles.gemm(MatMut::new(&mut c, p.m, p.n, p.ldc), a, b, *update) };
            let one = p.run(&mut Model::new(), *update);
            let same = c.iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "({}, {}, {}): differs from one product",
                p.m, p.n, p.kp
            );
        }
    }
    assert!(!model.configured(), "tiles still configured after the drop");
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the model runs anywhere.
        let _tiles = unsafe { kernel::Configured::new(&mut model) };
        panic!("a product failed");
    }));
    assert!(unwound.is_err());
    assert!(!model.configured(), "tiles still configured after a panic");
}

/// A NaN in A reaches only its row of C, one in B only its column, whatever the padding of
/// the edge tiles does.
#[test]
fn amx_kernel_keeps_nan_in_its_row_and_column() {
    let hw = hardware_too("amx_kernel_keeps_nan_in_its_row_and_column");
    let mut rng = SplitMix64::new(4);
    for (m, n, kp) in [(5, 32, 7), (20, 48, 19), (16, 16, 16)] {
        let mut p = Product::new(&mut rng, (m, n, kp));
        let (ri, pa, pb, cj) = (m / 2, kp - 1, kp / 2, n - 3);
        p.a[ri * p.lda + pa] = 0x7fc0_3f80; // (1.0, NaN)
        p.b[pb * p.ldb + cj] = 0x3f80_7fc0; // (NaN, 1.0)
        let mut units: Vec<(&str, Vec<f32>)> =
            vec![("model", p.run(&mut Model::new(), Update::Set))];
        if hw {
            units.push(("hardware", p.run(&mut Hardware, Update::Set)));
        }
        for (what, got) in units {
            for i in 0..m {
                for j in 0..n {
                    let nan = got[i * p.ldc + j].is_nan();
                    assert_eq!(
                        nan,
                        i == ri || j == cj,
                        "{what} ({m}, {n}, {kp}): ({i}, {j})"
                    );
                }
            }
        }
    }
}

/// The AMX limit's loop does the work it counts: 3 rounds × 4 tiles × 256 entries × 32
/// products of 2^-20 (16 pairs a row) (through the model; the hardware where it exists).
#[test]
fn the_limit_loop_computes_what_it_counts() {
    let want = (3 * 4 * 256 * 32) as f32 / (1u64 << 20) as f32;
    // SAFETY: the model runs anywhere.
    assert_eq!(
        unsafe { super::peak::tdpbf16ps_loop(&mut Model::new(), 3) },
        want
    );
    if hardware_too("the_limit_loop_computes_what_it_counts") {
        assert_eq!(crate::amx_tdpbf16ps_loop(3), Some(want));
    } else {
        assert_eq!(crate::amx_tdpbf16ps_loop(3), None);
    }
}
