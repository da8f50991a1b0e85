//! What each score modifier costs against the plain kernel, forward and forward + backward,
//! at one shape (default `1 8 2048 64`, causal, f32):
//!
//!     cargo run --release -p maskattn --example score_mods_cost -- [B H L d] [reps]
//!
//! The variants run alternately, round after round, and each reports its median time and
//! its ratio to the plain kernel's median, so that a busy machine slows all of them alike.
//! Benchmarks report; nothing here asserts on time. `only=N` runs variant `N` alone (for an
//! instruction count: `perf stat -e instructions ... -- 1 8 2048 64 1 only=1`).

use std::time::{Duration, Instant};

use maskattn::{alibi_slopes, BlockMask, Mask, MaskShape, Params, Qkv, RelBias, View};

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
    let n = b * h * l * d;
    let data = |seed: u32| -> Vec<f32> {
        (0..n)
            .map(|x| ((x as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    };
    let (q, k, v, dout) = (data(1), data(2), data(3), data(4));
    let shape = [b, h, l, d];
    let view = |name, x: &'static [f32]| View::bhld(name, x, shape).unwrap();
    let leak = |x: Vec<f32>| -> &'static [f32] { Box::leak(x.into_boxed_slice()) };
    let (q, k, v, dout) = (
        view("q", leak(q)),
        view("k", leak(k)),
        view("v", leak(v)),
        view("dout", leak(dout)),
    );
    let block = BlockMask::new(&Mask::causal(), MaskShape::new(b, h, l, l)).unwrap();
    let slopes = leak(alibi_slopes(h));
    let sinks = leak((0..h).map(|i| i as f32 * 0.1).collect());
    let table = leak((0..32 * h).map(|i| (i as f32 * 0.37).sin()).collect());
    let rel = RelBias::new(table, 32, 128, false).unwrap();
    let only: Option<usize> =
        std::env::args().find_map(|a| a.strip_prefix("only=").and_then(|n| n.parse().ok()));
    let mut variants: Vec<(&str, Params)> = vec![
        ("plain", Params::default()),
        ("softcap 30", Params::default().with_softcap(30.0)),
        ("alibi", Params::default().with_alibi(slopes)),
        ("sinks", Params::default().with_sinks(sinks)),
        ("t5 buckets", Params::default().with_rel(rel)),
        (
            "all four",
            Params::default()
                .with_softcap(30.0)
                .with_alibi(slopes)
                .with_sinks(sinks)
                .with_rel(rel),
        ),
    ];
    if let Some(i) = only {
        variants = vec![variants[i]];
    }
    println!(
        "shape (B, H, L, d) = ({b}, {h}, {l}, {d}), causal, f32, {} threads, kernel path: {}",
        rayon::current_num_threads(),
        maskattn::kernel_path()
    );
    let mut fwd = vec![Vec::new(); variants.len()];
    let mut both = vec![Vec::new(); variants.len()];
    for _ in 0..reps {
        for (i, (_, p)) in variants.iter().enumerate() {
            let t = Instant::now();
            let f = maskattn::forward(&q, &k, &v, &block, p).unwrap();
            let tf = t.elapsed();
            let out = View::bhld("out", &f.out, shape).unwrap();
            let g =
                maskattn::backward(&Qkv::new(&q, &k, &v), &out, &f.lse, &dout, &block, p).unwrap();
            std::hint::black_box(&g);
            fwd[i].push(tf);
            both[i].push(t.elapsed());
        }
    }
    let median = |x: &mut Vec<Duration>| {
        x.sort();
        x[x.len() / 2].as_secs_f64() * 1e3
    };
    let (f0, b0) = (median(&mut fwd[0].clone()), median(&mut both[0].clone()));
    println!(
        "{:<12} {:>10} {:>7} {:>14} {:>7}",
        "variant", "fwd ms", "x plain", "fwd+bwd ms", "x plain"
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        let (f, bb) = (median(&mut fwd[i]), median(&mut both[i]));
        println!(
            "{name:<12} {f:>10.2} {:>7.2} {bb:>14.2} {:>7.2}",
            f / f0,
            bb / b0
        );
    }
}
