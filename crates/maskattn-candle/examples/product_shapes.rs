//! The model path's f32 products (`maskattn_candle::products::gemm_f32`, as the fused linear
//! layer calls them: row-major results) at the shapes `maskattn train` and a 384-wide
//! encoder make, in GFLOP/s. `bench/compare_products.py` runs it beside PyTorch's `torch.mm`.
//!
//!     cargo run --release -p maskattn-candle --example product_shapes -- [threads] [reps] [layout]
//!
//! `layout` is how the operands lie, as the linear layer's three products lay them:
//! `fwd` (default) `y = x · Wᵀ`, `dx` `dx = dy · W` (both operands row-major), `dw`
//! `dW = dyᵀ · x` (the left operand the transpose of a row-major matrix: read down its
//! columns). One line per shape: `m k n gflops` (`[m × k] · [k × n]`, the median of `reps`
//! timed calls after 5 untimed ones), then the instruction set the products ran on.

use std::time::Instant;

/// `(m, k, n)`: the training model's (2048 tokens, d_model 128, MLP 512, vocabulary 259;
/// the products with `k = 2048` are its weight gradients'), then an encoder's (1280 tokens,
/// d_model 384, MLP 1536).
const SHAPES: [(usize, usize, usize); 10] = [
    (2048, 128, 128),
    (2048, 128, 512),
    (2048, 512, 128),
    (2048, 128, 259),
    (128, 2048, 128),
    (512, 2048, 128),
    (128, 2048, 512),
    (1280, 384, 384),
    (1280, 384, 1536),
    (1280, 1536, 384),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args
        .next()
        .map_or(2, |a| a.parse().expect("threads: a number"));
    let reps: usize = args
        .next()
        .map_or(30, |a| a.parse().expect("reps: a number"));
    let layout = args.next().unwrap_or_else(|| "fwd".into());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    for (m, k, n) in SHAPES {
        // `a` holds the left operand's m·k values, `b` the right one's k·n; `(cs, rs)` say
        // where element (i, p) of each is: at `i·rs + p·cs`.
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let (ki, mi, ni) = (k as isize, m as isize, n as isize);
        let (lhs, rhs) = match layout.as_str() {
            // x [m × k] row-major; W [n × k] row-major, read as Wᵀ.
            "fwd" => ((1, ki), (ki, 1)),
            // dy [m × k] row-major; W [k × n] row-major.
            "dx" => ((1, ki), (1, ni)),
            // dy [k × m] row-major, read as dyᵀ; x [k × n] row-major.
            "dw" => ((mi, 1), (1, ni)),
            other => panic!("layout: fwd, dx or dw, not {other:?}"),
        };
        let mut c = vec![0f32; m * n];
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut once = || {
            // SAFETY: in each layout, every element (i, p) of the left operand, at
            // `i·rs + p·cs`, is below `m·k`, and every element (p, j) of the right one below
            // `k·n`: inside `a` and `b`; `c` is `m × n` row-major, a distinct vector.
            unsafe {
                maskattn_candle::products::gemm_f32(
                    (m, n, k),
                    (c.as_mut_ptr(), 1, n as isize, false),
                    (a.as_ptr(), lhs.0, lhs.1),
                    (b.as_ptr(), rhs.0, rhs.1),
                    0.0,
                    1.0,
                    par,
                )
            }
        };
        let mut times: Vec<f64> = pool.install(|| {
            for _ in 0..5 {
                once();
            }
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    once();
                    t.elapsed().as_secs_f64()
                })
                .collect()
        });
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("{m} {k} {n} {:.1}", 2.0 * (m * k * n) as f64 / median / 1e9);
    }
    println!(
        "isa {:?} on {}",
        maskattn_candle::products::products_isa(),
        maskattn_candle::products::products_backend()
    );
}
