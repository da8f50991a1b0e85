//! What `bench`, `bench-layer` and `demo` share: shape flags, sizes computed from them
//! without wrapping, deterministic data, timing by the median, and the machine's practical
//! peak and read bandwidth.

use std::time::Instant;

use anyhow::{bail, Context, Result};

/// `N` comma-separated numbers (shape flags such as `--shape B,H,L,d`).
pub fn parse_dims<const N: usize>(s: &str) -> Result<[usize; N], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("`{x}` is not a number"))
        })
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| format!("expected {N} comma-separated numbers"))
}

/// The number of elements of a tensor shaped `dims`, which must also fit in memory as
/// `f32`s: a product that wraps would allocate a small buffer for a huge shape.
pub fn elements(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .with_context(|| format!("{what} {dims:?}: too many elements to hold in memory"))
}

/// Fails unless every dimension is at least 1.
pub fn nonzero(flag: &str, dims: &[usize]) -> Result<()> {
    if dims.contains(&0) {
        bail!("{flag} {dims:?}: every dimension must be at least 1");
    }
    Ok(())
}

/// Deterministic data in [−1, 1).
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    (0..n as u64).map(|i| value(i, seed)).collect()
}

/// [`data`] of a size the user chose: an error, not an abort, when memory runs out.
pub fn try_data(n: usize, seed: u64) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .with_context(|| format!("cannot allocate {n} values ({} MiB)", (n as u128 * 4) >> 20))?;
    v.extend((0..n as u64).map(|i| value(i, seed)));
    Ok(v)
}

fn value(i: u64, seed: u64) -> f32 {
    let x = (i ^ (seed << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Runs `f` `reps` times (at least once) and returns its last result and the median time
/// in ms. Every run counts: callers that want a warm-up run `f` once before.
pub fn median_of<T, E>(reps: usize, mut f: impl FnMut() -> Result<T, E>) -> Result<(T, f64), E> {
    let mut times = Vec::with_capacity(reps.max(1));
    let mut last = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((last.expect("at least one run"), times[times.len() / 2]))
}

/// Times `f` `reps` times after one warm-up run; returns the median in ms.
pub fn median_ms<E>(reps: usize, mut f: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    f()?;
    Ok(median_of(reps, f)?.1)
}

/// [`median_ms`] of an infallible `f`.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    let r: Result<f64, std::convert::Infallible> = median_ms(reps, || {
        f();
        Ok(())
    });
    r.unwrap_or_else(|e| match e {})
}

/// The practical peak: GFLOP/s of a 2048³ f32 matrix product (the `gemm` crate, which candle
/// also uses, on the kernels' instruction set: `maskattn_candle::products`) on the same
/// threads.
pub fn practical_peak() -> f64 {
    let n = 2048;
    let a = data(n * n, 1);
    let b = data(n * n, 2);
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    // On the kernels' instruction set, as the model path's products run (`MASKATTN_ISA`).
    // SAFETY: `a`, `b` and `c` each hold `n × n` f32, addressed row-major (rows `n` apart,
    // columns 1 apart) exactly inside them, which is `gemm_f32`'s contract; `c` is borrowed
    // mutably here and aliases neither input; `read_dst` is false, so `c`'s old contents
    // are not read.
    let ms = time(3, || unsafe {
        maskattn_candle::products::gemm_f32(
            (n, n, n),
            (c.as_mut_ptr(), 1, n as isize, false),
            (a.as_ptr(), 1, n as isize),
            (b.as_ptr(), 1, n as isize),
            0.0,
            1.0,
            gemm::Parallelism::Rayon(threads),
        )
    });
    2.0 * (n * n * n) as f64 / ms / 1e6
}

/// The practical memory bandwidth: GB/s of a parallel read of 256 MiB (the same threads),
/// the ceiling of the memory-bound decode step.
pub fn practical_bandwidth() -> f64 {
    use rayon::prelude::*;
    let v = data(64 << 20, 3);
    let ms = time(3, || {
        let m = v
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
            .reduce(|| f32::NEG_INFINITY, f32::max);
        std::hint::black_box(m);
    });
    (v.len() * 4) as f64 / ms / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_wrap_or_cannot_be_held_are_errors() {
        assert_eq!(elements("q", &[2, 3, 4]).unwrap(), 24);
        for dims in [
            &[4294967296, 4294967296, 1, 1][..],
            &[3, 6148914691236517206, 1, 1],
            &[3, 3074457345618258603, 1, 1],
        ] {
            let e = elements("q", dims).unwrap_err().to_string();
            assert!(e.contains("too many elements"), "{dims:?}: {e}");
        }
        assert!(try_data(usize::MAX / 4, 0).is_err());
        assert_eq!(try_data(5, 7).unwrap(), data(5, 7));
        assert!(nonzero("--shape", &[1, 0]).is_err());
    }

    #[test]
    fn median_of_keeps_the_last_result_and_counts_every_run() {
        let mut calls = 0;
        let (last, ms) = median_of(3, || -> Result<usize, ()> {
            calls += 1;
            Ok(calls)
        })
        .unwrap();
        assert_eq!((last, calls), (3, 3));
        assert!(ms >= 0.0);
        let mut calls = 0;
        median_ms(4, || -> Result<(), ()> {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 5, "one warm-up and four timed runs");
    }
}
