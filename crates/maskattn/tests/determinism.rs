//! The backward has only a deterministic mode: repeated passes are bitwise equal, and so are
//! results computed with different numbers of threads.

mod common;

use common::random_case;
use maskattn::Mask;

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn fifty_backward_passes_are_bitwise_equal() {
    let mut c = random_case(42, [2, 4, 2, 150, 170, 32], (32, 48), true);
    c.mask = Mask::causal() & Mask::key_padding(vec![170, 120]);
    let first = c.run_kernel();
    for _ in 0..50 {
        let again = c.run_kernel();
        for (a, b) in first.iter().zip(&again) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    for seed in 0..6 {
        let c = random_case(seed, [2, 6, 3, 97, 131, 20], (16, 32), seed % 2 == 0);
        let one = in_pool(1, || c.run_kernel());
        for threads in [2, 3, 5] {
            let many = in_pool(threads, || c.run_kernel());
            for (a, b) in one.iter().zip(&many) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "seed {seed}: {threads} threads differ from 1"
                );
            }
        }
    }
}

/// The same for bf16 storage (the AVX512-BF16 path where the CPU has it).
#[test]
fn bf16_results_do_not_depend_on_thread_count_or_run() {
    use maskattn::half::bf16;
    common::report_bf16_path("bf16_results_do_not_depend_on_thread_count_or_run");
    for seed in 0..4 {
        let c =
            random_case(seed, [2, 6, 3, 97, 131, 20], (16, 32), seed % 2 == 0).rounded::<bf16>();
        let one = in_pool(1, || c.run_kernel_half::<bf16>());
        for threads in [1, 2, 3] {
            let many = in_pool(threads, || c.run_kernel_half::<bf16>());
            for (a, b) in one.iter().zip(&many) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "seed {seed}: {threads} threads differ from 1"
                );
            }
        }
    }
}
