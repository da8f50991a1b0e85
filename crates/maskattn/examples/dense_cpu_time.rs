//! The dense (full-mask) f32 forward and forward + backward in CPU time, for comparing
//! builds on a busy machine, where wall time mostly measures the other processes:
//!
//!     MASKATTN_ISA=avx2 cargo run --release -p maskattn --example dense_cpu_time -- B H L d [reps] [threads]
//!
//! Each pass runs `reps` times (default 7) on a pool of `threads` threads (default 1); the
//! line reports the least CPU time of a run (the sum over the process's threads, from
//! `/proc/self/task/*/schedstat`, Linux only) and the GFLOP/s that makes (forward
//! 4·B·H·L²·d, forward + backward 3.5× that, as `maskattn bench` counts them). Benchmarks
//! report; nothing here asserts on time.

use maskattn::{BlockMask, Mask, MaskShape, Params, Qkv, View};

/// CPU time so far of every thread of this process, in seconds.
fn cpu_seconds() -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").expect("Linux /proc") {
        let path = task.unwrap().path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(path) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 * 1e-9
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let [b, h, l, d] = match args[..] {
        [b, h, l, d, ..] => [b, h, l, d],
        _ => [1, 8, 2048, 64],
    };
    let reps = args.get(4).copied().unwrap_or(7);
    let threads = args.get(5).copied().unwrap_or(1);
    let n = b * h * l * d;
    let data = |seed: u32| -> Vec<f32> {
        (0..n)
            .map(|x| ((x as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    };
    let (q, k, v, dout) = (data(1), data(2), data(3), data(4));
    let shape = [b, h, l, d];
    let view = |name, x| View::bhld(name, x, shape).unwrap();
    let (q, k, v, dout) = (
        view("q", &q),
        view("k", &k),
        view("v", &v),
        view("dout", &dout),
    );
    let block = BlockMask::new(&Mask::full(), MaskShape::new(b, h, l, l)).unwrap();
    let p = Params::default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let fwd_flop = 4.0 * (b * h * l * l * d) as f64;
    let time = |f: &dyn Fn()| {
        f(); // warm up
        (0..reps)
            .map(|_| {
                let t0 = cpu_seconds();
                f();
                cpu_seconds() - t0
            })
            .fold(f64::INFINITY, f64::min)
    };
    let fwd = pool.install(|| {
        time(&|| {
            maskattn::forward(&q, &k, &v, &block, &p).unwrap();
        })
    });
    let both = pool.install(|| {
        time(&|| {
            let f = maskattn::forward(&q, &k, &v, &block, &p).unwrap();
            let out = View::bhld("out", &f.out, shape).unwrap();
            maskattn::backward(&Qkv::new(&q, &k, &v), &out, &f.lse, &dout, &block, &p).unwrap();
        })
    });
    println!(
        "{} {b},{h},{l},{d} t{threads}: fwd {:.2} ms CPU {:.1} GFLOP/s; fwd+bwd {:.2} ms CPU {:.1} GFLOP/s",
        maskattn::kernel_path(),
        fwd * 1e3,
        fwd_flop / fwd * 1e-9,
        both * 1e3,
        3.5 * fwd_flop / both * 1e-9,
    );
}
