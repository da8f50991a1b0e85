//! The model path's f32 products (`maskattn_candle::products::gemm_f32`, as the fused linear
//! layer calls it: row-major, `x · Wᵀ`) at the shapes `maskattn train` and a 384-wide
//! encoder make, in GFLOP/s. `bench/compare_products.py` runs it beside PyTorch's `torch.mm`.
//!
//!     cargo run --release -p maskattn-candle --example product_shapes -- [threads] [reps]
//!
//! One line per shape: `m k n gflops` (`[m × k] · [k × n]`, the median of `reps` timed
//! calls after 5 untimed ones), then the instruction set the products ran on.

use std::time::Instant;

/// `(m, k, n)`: the training model's (2048 tokens, d_model 128, MLP 512, vocabulary 259,
/// forward and the weight gradient), then an encoder's (1280 tokens, d_model 384, MLP 1536).
const SHAPES: [(usize, usize, usize); 8] = [
    (2048, 128, 128),
    (2048, 128, 512),
    (2048, 512, 128),
    (2048, 128, 259),
    (512, 2048, 128),
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
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    for (m, k, n) in SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let mut once = || {
            // SAFETY: `a` is `m × k` row-major, `w` is `n × k` row-major (read as `Wᵀ`,
            // `k × n`: element (p, j) at `j·k + p`), `c` is `m × n` row-major: every
            // element inside its vector; `c` is a distinct vector.
            unsafe {
                maskattn_candle::products::gemm_f32(
                    (m, n, k),
                    (c.as_mut_ptr(), 1, n as isize, false),
                    (a.as_ptr(), 1, k as isize),
                    (w.as_ptr(), k as isize, 1),
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
    println!("isa {:?}", maskattn_candle::products::products_isa());
}
