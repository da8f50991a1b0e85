//! The model path's f32 products (`maskattn_candle::products`) on every instruction set this
//! CPU can run — gemm's AVX-512, AVX2+FMA and scalar kernels, forced with `set_isa` as
//! `MASKATTN_ISA` forces them — against an f64 product: row- and column-major results,
//! transposed operands, `dst` read and scaled, one thread and several; a product split into
//! one band per thread gives the bits of the whole. In a process of its own because the
//! choice is process-wide. Where the system has OpenBLAS, the same tests run again in a
//! child process with `OPENBLAS_CORETYPE=Haswell`, where the AVX2 products take OpenBLAS's
//! AVX2 kernels (`openblas.rs`), and check that they did.

use maskattn::{set_isa, Isa};
use maskattn_candle::products::{
    gemm_f32, openblas_core, products_backend, products_isa, products_run, products_run_blas,
    products_split,
};

/// Set in the child process that runs these tests on OpenBLAS's Haswell kernels.
const CHILD: &str = "MASKATTN_TEST_OPENBLAS_CHILD";

/// Whether this process must run its AVX2 products on OpenBLAS (the child).
fn blas_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Checks, where this is the OpenBLAS child and `isa` AVX2, that `ran` products ran on
/// OpenBLAS; names what ran them, for the report.
fn backend_ran(isa: Isa, blas_before: u64, ran: u64) -> String {
    let blas = products_run_blas() - blas_before;
    if blas_child() && isa == Isa::Avx2 {
        assert_eq!(blas, ran, "Avx2: not every product ran on OpenBLAS");
    }
    if blas > 0 {
        format!("{} ({blas} of them)", products_backend())
    } else {
        "gemm".into()
    }
}

/// The tests set the process-wide instruction set and read process-wide counters: one at
/// a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A line shown even when the test passes (the harness captures `eprintln!`).
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A product `dst = alpha·dst + beta·lhs·rhs` with its layouts: `(rs, cs)` of each matrix.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    dst_t: bool,
    lhs_t: bool,
    rhs_t: bool,
    read_dst: bool,
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = maskattn::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// `(rs, cs)` of an `rows × cols` matrix stored row-major, or column-major with `t`.
fn strides(rows: usize, cols: usize, t: bool) -> (isize, isize) {
    if t {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// The case's operands and `dst` before and after the product on the current instruction
/// set: `(lhs, rhs, dst before, dst after)`.
fn product(c: &Case, par: gemm::Parallelism, seed: u64) -> [Vec<f32>; 4] {
    let (m, n, k) = (c.m, c.n, c.k);
    let (lhs, rhs) = (data(m * k, seed), data(k * n, seed + 1));
    let mut dst = data(m * n, seed + 2);
    let old = dst.clone();
    let (l_rs, l_cs) = strides(m, k, c.lhs_t);
    let (r_rs, r_cs) = strides(k, n, c.rhs_t);
    let (d_rs, d_cs) = strides(m, n, c.dst_t);
    let (alpha, beta) = scales(c);
    // SAFETY: every element of the three matrices is inside its vector (the strides of a
    // dense `rows × cols` layout); `dst` is a distinct vector.
    unsafe {
        gemm_f32(
            (m, n, k),
            (dst.as_mut_ptr(), d_cs, d_rs, c.read_dst),
            (lhs.as_ptr(), l_cs, l_rs),
            (rhs.as_ptr(), r_cs, r_rs),
            alpha,
            beta,
            par,
        )
    };
    [lhs, rhs, old, dst]
}

/// `(alpha, beta)` of the case: `dst` scaled by 0.75 when read.
fn scales(c: &Case) -> (f32, f32) {
    (if c.read_dst { 0.75 } else { 0.0 }, 1.25)
}

/// Runs the case on the current instruction set and checks it against f64; returns the
/// largest error relative to the f64 result's scale.
fn run(c: &Case, par: gemm::Parallelism, seed: u64) -> f64 {
    let (m, n, k) = (c.m, c.n, c.k);
    let [lhs, rhs, old, dst] = product(c, par, seed);
    let (l_rs, l_cs) = strides(m, k, c.lhs_t);
    let (r_rs, r_cs) = strides(k, n, c.rhs_t);
    let (d_rs, d_cs) = strides(m, n, c.dst_t);
    let (alpha, beta) = scales(c);
    let at =
        |rs: isize, cs: isize, i: usize, j: usize| (i as isize * rs + j as isize * cs) as usize;
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let mut want = 0f64;
            let mut scale = 0f64;
            for p in 0..k {
                let x = lhs[at(l_rs, l_cs, i, p)] as f64 * rhs[at(r_rs, r_cs, p, j)] as f64;
                want += x;
                scale += x.abs();
            }
            let d = at(d_rs, d_cs, i, j);
            let prior = if c.read_dst { old[d] as f64 } else { 0.0 };
            let want = alpha as f64 * prior + beta as f64 * want;
            let scale = alpha as f64 * prior.abs() + beta as f64 * scale + 1e-30;
            worst = worst.max((dst[d] as f64 - want).abs() / scale);
        }
    }
    worst
}

#[test]
fn products_run_on_the_kernels_instruction_set() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cases = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (64, 384, 96),
        (130, 40, 257),
        (1, 1536, 384),
        (300, 200, 100),
    ];
    for isa in Isa::ALL {
        if set_isa(Some(isa)).is_err() {
            report(&format!(
                "products_isa: SKIPPED {isa:?} (this CPU lacks it)"
            ));
            continue;
        }
        assert_eq!(products_isa(), isa, "the products follow the kernels' set");
        let (before, blas_before) = (products_run(isa), products_run_blas());
        let mut calls = 0;
        for (n_case, &(m, n, k)) in cases.iter().enumerate() {
            for layout in 0..16u32 {
                let c = Case {
                    m,
                    n,
                    k,
                    dst_t: layout & 1 != 0,
                    lhs_t: layout & 2 != 0,
                    rhs_t: layout & 4 != 0,
                    read_dst: layout & 8 != 0,
                };
                for par in [gemm::Parallelism::None, gemm::Parallelism::Rayon(3)] {
                    let seed = 100 * n_case as u64 + layout as u64;
                    let err = run(&c, par, seed);
                    calls += 1;
                    // f32 sums of k products: a few ulps of the sum of magnitudes.
                    assert!(
                        err <= 4.0 * k as f64 * f32::EPSILON as f64,
                        "{isa:?} {m}×{n}×{k} layout {layout:04b}: error {err:.2e}"
                    );
                }
            }
        }
        let ran = products_run(isa) - before;
        assert_eq!(ran, calls, "{isa:?}: products not counted on their level");
        let backend = backend_ran(isa, blas_before, ran);
        report(&format!(
            "products_isa: ran {calls} f32 products on {isa:?} on {backend}, each within f32 \
             rounding of f64"
        ));
    }
    set_isa(None).unwrap();
}

#[test]
fn a_product_split_over_threads_gives_the_bits_of_the_whole() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The model's shapes (rows × out × in, and the weight gradient's), shapes just past
    // the split's limits (a side of 4, k = 3, each at least 2²⁰ multiply-adds), and a
    // reduction of several blocks.
    let cases = [
        (2048, 512, 128),
        (512, 128, 2048),
        (128, 512, 2048),
        (4608, 64, 64),
        (87_400, 4, 3),
        (4, 160, 1700),
        (300, 70, 1300),
    ];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for isa in Isa::ALL {
        if set_isa(Some(isa)).is_err() {
            report(&format!(
                "products_isa: SKIPPED {isa:?} split (this CPU lacks it)"
            ));
            continue;
        }
        let (before, blas_before) = (products_split(), products_run_blas());
        let (mut calls, mut thin) = (0u64, 0u64);
        for (n_case, &(m, n, k)) in cases.iter().enumerate() {
            for layout in [0u32, 0b0111, 0b1000, 0b1010] {
                // OpenBLAS splits only the rows of the row-major result it computes (`dst`,
                // or `dstᵀ` where `dst` is column-major), in bands of a multiple of 12:
                // two bands, or none where the first would hold every row.
                let rows: usize = if layout & 1 != 0 { n } else { m };
                thin += (rows.div_ceil(2).next_multiple_of(12) >= rows) as u64;
                let c = Case {
                    m,
                    n,
                    k,
                    dst_t: layout & 1 != 0,
                    lhs_t: layout & 2 != 0,
                    rhs_t: layout & 4 != 0,
                    read_dst: layout & 8 != 0,
                };
                let seed = 7 + 10 * n_case as u64 + layout as u64;
                let [.., whole] = product(&c, gemm::Parallelism::None, seed);
                let [.., split] = pool.install(|| product(&c, gemm::Parallelism::Rayon(2), seed));
                calls += 1;
                let same = whole
                    .iter()
                    .zip(&split)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{isa:?} {m}×{n}×{k} layout {layout:04b}: split ≠ whole"
                );
            }
        }
        // Each product ran whole once and split once.
        let backend = backend_ran(isa, blas_before, 2 * calls);
        let on_blas = backend != "gemm";
        let split = products_split() - before;
        assert_eq!(
            split,
            calls - if on_blas { thin } else { 0 },
            "{isa:?}: not every product split"
        );
        // Bands of 64 or fewer rows by ≤ 64 would take gemm's small-shape blocks (k in
        // blocks of 512) where the whole product takes its cache-sized ones: other bits.
        // On gemm these stay whole; on OpenBLAS they split. Either way, the bits of one
        // thread.
        let before = products_split();
        for &(m, n, k) in &[(128usize, 64usize, 700usize), (96, 64, 700)] {
            let c = Case {
                m,
                n,
                k,
                dst_t: false,
                lhs_t: false,
                rhs_t: true,
                read_dst: false,
            };
            let [.., whole] = product(&c, gemm::Parallelism::None, 3);
            let [.., par] = pool.install(|| product(&c, gemm::Parallelism::Rayon(2), 3));
            let same = whole
                .iter()
                .zip(&par)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{isa:?} {m}×{n}×{k}: two threads ≠ one");
        }
        assert_eq!(
            products_split() - before,
            if on_blas { 2 } else { 0 },
            "{isa:?}: narrow bands split on gemm, or not on OpenBLAS"
        );
        report(&format!(
            "products_isa: {split} of {calls} products split over 2 threads on {isa:?} on {backend}, \
             each the bits of the unsplit product"
        ));
    }
    set_isa(None).unwrap();
}

/// The two tests above again, in a child process whose OpenBLAS (where the system has it)
/// chose its Haswell (AVX2) kernels, so that the AVX2 products run on OpenBLAS on any
/// x86-64 CPU with AVX2, this one's AVX-512 included.
#[test]
fn the_same_on_openblas_avx2_kernels() {
    if blas_child() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(core) = openblas_core() else {
        report(
            "products_isa: SKIPPED OpenBLAS (not installed: Debian's libopenblas0-pthread; \
             or MASKATTN_BLAS=off)",
        );
        return;
    };
    if set_isa(Some(Isa::Avx2)).is_err() {
        report("products_isa: SKIPPED OpenBLAS's AVX2 kernels (this CPU lacks AVX2)");
        return;
    }
    set_isa(None).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "products_run_on_the_kernels_instruction_set",
            "a_product_split_over_threads_gives_the_bits_of_the_whole",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .env("OPENBLAS_CORETYPE", "Haswell")
        .output()
        .expect("the test binary runs again");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the OpenBLAS child failed:\n{text}");
    // Both tests ran in the child, each with its AVX2 products on OpenBLAS.
    assert!(text.contains("2 passed"), "{text}");
    let on_blas = text.matches("on Avx2 on OpenBLAS Haswell").count();
    assert_eq!(on_blas, 2, "{text}");
    report(&format!(
        "products_isa: the AVX2 products on OpenBLAS Haswell in a child process (this \
         process's OpenBLAS chose {core}), within f32 rounding of f64, splits the bits of the whole"
    ));
}
