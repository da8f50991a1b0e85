//! The f32 (or bf16) forward alone, timed, with nothing else in the process — for a profile
//! (`perf record`) or an A/B pair of builds:
//!
//!     cargo run --release -p maskattn --example forward_time -- [B H L d] [reps] [bf16] [causal] [tq=N] [tk=N]
//!
//! Prints the median milliseconds and the GFLOP/s of the products (`4·B·H·L²·d`, every pair
//! counted), and on Linux the median CPU time the process's threads spent per call (from
//! `/proc/self/task/*/schedstat`): on a machine shared with other work the wall time
//! includes waiting for a core, the CPU time mostly does not. Benchmarks report; nothing
//! here asserts on time.

use std::time::Instant;

use maskattn::{forward, half, BlockMask, Element, Mask, MaskShape, Params, View};

/// Nanoseconds the process's threads have run on a CPU (0 where `/proc` has no schedstat).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// `reps` forwards of `[q, k, v]`: the wall and CPU seconds of each.
fn time<T: Element>(
    qkv: &[Vec<T>; 3],
    shape: [usize; 4],
    block: &BlockMask,
    reps: usize,
) -> (Vec<f64>, Vec<f64>) {
    let [q, k, v] = qkv.each_ref().map(|x| View::bhld("x", x, shape).unwrap());
    let params = Params::default();
    let (mut times, mut cpu) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let (t, c) = (Instant::now(), cpu_ns());
        std::hint::black_box(forward(&q, &k, &v, block, &params).unwrap());
        times.push(t.elapsed().as_secs_f64());
        cpu.push((cpu_ns() - c) as f64 * 1e-9);
    }
    (times, cpu)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<usize> = argv.iter().filter_map(|a| a.parse().ok()).collect();
    let [b, h, l, d] = match nums[..] {
        [b, h, l, d, ..] => [b, h, l, d],
        _ => [1, 8, 2048, 64],
    };
    let reps = nums.get(4).copied().unwrap_or(9);
    let bf16 = argv.iter().any(|a| a == "bf16");
    let causal = argv.iter().any(|a| a == "causal");
    let mask = if causal { Mask::causal() } else { Mask::full() };
    let n = b * h * l * d;
    let data = |seed: u32| -> Vec<f32> {
        (0..n)
            .map(|x| ((x as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    };
    let (q, k, v) = (data(1), data(2), data(3));
    let shape = [b, h, l, d];
    let tile = |key: &str, default: usize| {
        argv.iter()
            .find_map(|a| a.strip_prefix(key)?.parse().ok())
            .unwrap_or(default)
    };
    let (tq, tk) = (
        tile("tq=", maskattn::DEFAULT_TILE_Q),
        tile("tk=", maskattn::DEFAULT_TILE_K),
    );
    let block = BlockMask::with_tiles(&mask, MaskShape::new(b, h, l, l), tq, tk).unwrap();
    let (mut times, mut cpu) = if bf16 {
        let to16 =
            |x: &[f32]| -> Vec<half::bf16> { x.iter().map(|&v| half::bf16::from_f32(v)).collect() };
        time(&[to16(&q), to16(&k), to16(&v)], shape, &block, reps)
    } else {
        time(&[q, k, v], shape, &block, reps)
    };
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let (med, cpu_med) = (times[times.len() / 2], cpu[cpu.len() / 2]);
    let flop = 4.0 * (b * h * l * l * d) as f64;
    println!(
        "({b},{h},{l},{d}) {} {}: median {:.2} ms, {:.1} GFLOP/s (every pair), {} threads; CPU time {:.2} ms per call",
        if bf16 { "bf16" } else { "f32" },
        if causal { "causal" } else { "full" },
        med * 1e3,
        flop / med / 1e9,
        rayon::current_num_threads(),
        cpu_med * 1e3
    );
}
