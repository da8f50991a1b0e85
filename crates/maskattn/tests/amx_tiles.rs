//! The bf16 forward and backward with their products on AMX tiles: through the plain-Rust
//! model of the tile instructions on every x86-64 CPU — its operands packed on AVX512-BF16
//! where the kernels run on AVX-512 and the CPU has it, and in scalar code where not (run
//! here as well on a CPU that has it, by forcing AVX2) — and through the hardware as well
//! where the CPU has AMX (else SKIPPED). Against the f64 reference under the accuracy rule;
//! hidden NaN/∞ bit for bit; rows that see nothing; 1, 2 and 3 threads bit for bit.

mod common;

use common::mods::ModCase;
use common::{random_case, Case, Layout};
use maskattn::half::bf16;
use maskattn::{set_amx, set_isa, AmxMode, Dropout, Isa, Mask, MaskShape};

/// `set_amx` and `set_isa` are process-wide: one test at a time chooses them.
static MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` once per AMX mode this CPU can run, with that mode forced, and says which ran
/// and where the operands were packed: the model always — with its operands packed on
/// AVX512-BF16 where the CPU has it, and once more with a narrower instruction set forced
/// (the kernels then have no bf16 instructions: scalar packing, as on an AVX2-only CPU) —
/// and the hardware where it exists. Nothing runs with `MASKATTN_BF16_DOT=0` (bf16 widened).
fn for_each_amx_mode(test: &str, f: impl Fn(AmxMode)) {
    let _one = MODE.lock().unwrap_or_else(|e| e.into_inner());
    set_isa(None).unwrap();
    set_amx(Some(AmxMode::Model)).unwrap();
    if !maskattn::bf16_dot_available() {
        set_amx(None).unwrap();
        common::report(&format!(
            "{test}: SKIPPED amx model and hardware (bf16 widened: MASKATTN_BF16_DOT=0)"
        ));
        return;
    }
    // (mode, instruction set forced for the run, packing expected)
    let mut runs = vec![(AmxMode::Model, None, maskattn::bf16_packing())];
    if maskattn::bf16_packing() != "scalar" {
        let narrower = [Isa::Avx2, Isa::Portable]
            .into_iter()
            .find(|i| Isa::available().contains(i))
            .unwrap();
        runs.push((AmxMode::Model, Some(narrower), "scalar"));
    }
    if set_amx(Some(AmxMode::Hardware)).is_ok() {
        runs.push((AmxMode::Hardware, None, maskattn::bf16_packing()));
    } else {
        common::report(&format!(
            "{test}: SKIPPED amx hardware (this CPU lacks AMX)"
        ));
    }
    for (mode, isa, packing) in runs {
        set_amx(Some(mode)).unwrap();
        set_isa(isa).unwrap();
        let path = maskattn::kernel_path();
        assert_eq!(
            path.amx, mode,
            "kernel_path does not report the forced mode"
        );
        assert!(
            path.bf16_dot,
            "{mode:?} on {isa:?}: bf16 not on the pair products"
        );
        assert_eq!(maskattn::bf16_packing(), packing, "{mode:?} on {isa:?}");
        common::report(&format!(
            "{test}: ran {path}; operands packed in {packing} code"
        ));
        let (products, scalar) = (
            maskattn::amx_model_products(),
            maskattn::bf16_scalar_packings(),
        );
        f(mode);
        if mode == AmxMode::Model {
            assert!(
                maskattn::amx_model_products() > products,
                "{test}: the bf16 path did not go through the AMX kernel"
            );
        }
        let scalar = maskattn::bf16_scalar_packings() - scalar;
        if packing == "scalar" {
            assert!(scalar > 0, "{test}: the scalar packing did not run");
        } else {
            assert_eq!(scalar, 0, "{test}: the scalar packing ran beside {packing}");
        }
    }
    set_isa(None).unwrap();
    set_amx(None).unwrap();
}

fn with_mask(mut c: Case, mask: Mask) -> Case {
    c.mask = mask;
    c
}

/// Shapes `[B, H_q, H_kv, L_q, L_k, d]`: d not a multiple of 32 (nor of 16), lengths not
/// multiples of 16, GQA, `L_q ≠ L_k`, one query row per tile and whole tiles of 64.
const SHAPES: [[usize; 6]; 6] = [
    [1, 2, 2, 113, 203, 59],
    [2, 4, 2, 130, 77, 64],
    [1, 3, 1, 70, 70, 40],
    [1, 2, 1, 33, 129, 16],
    [2, 2, 2, 64, 64, 96],
    [1, 1, 1, 17, 5, 1],
];

#[test]
fn bf16_through_amx_matches_the_reference() {
    for_each_amx_mode("bf16_through_amx_matches_the_reference", |_| {
        for (n, &dims) in SHAPES.iter().enumerate() {
            let [b, _, _, lq, lk, _] = dims;
            let masks = [
                Mask::causal(),
                Mask::window(lk / 3, 1),
                // Three documents over the keys, two over the queries.
                Mask::documents_cross(
                    (0..lq).map(|i| (2 * i / lq) as i64).collect::<Vec<_>>(),
                    (0..lk).map(|j| (3 * j / lk) as i64).collect::<Vec<_>>(),
                    1,
                ),
                // Padding, with a batch row of no keys at all (rows that see nothing).
                Mask::key_padding(
                    (0..b)
                        .map(|x| if x == 1 { 0 } else { lk - lk / 4 })
                        .collect::<Vec<_>>(),
                ) & Mask::query_padding(vec![lq - 1; b]),
            ];
            for (i, mask) in masks.into_iter().enumerate() {
                let seed = 11_000 + 10 * n as u64 + i as u64;
                let tiles = [(64, 64), (16, 100), (7, 13), (32, 48)][i];
                let c = random_case(seed, dims, tiles, i % 2 == 1);
                with_mask(c, mask).rounded::<bf16>().check_half::<bf16>();
            }
            // And the random masks and dropout of the shared cases.
            let c = random_case(12_000 + n as u64, dims, (64, 64), n % 2 == 0);
            c.rounded::<bf16>().check_half::<bf16>();
        }
    });
}

/// Full tiles take the column form on AMX too (`Sᵀ = K·Qᵀ`, the softmax with lanes over
/// query rows, `P̃ᵀ` transposed back to bf16 rows for `P̃·V` on tiles): a full mask, odd
/// lengths (a last key tile of odd width, a last query tile of odd height), GQA, and
/// dropout, soft-capping and sinks, which the column form applies lane-wise.
#[test]
fn full_tiles_take_the_column_form_through_amx() {
    for_each_amx_mode("full_tiles_take_the_column_form_through_amx", |mode| {
        let shapes = [
            [1, 4, 2, 97, 131, 40],
            [2, 3, 1, 113, 77, 59],
            [1, 2, 2, 64, 96, 64],
        ];
        for (n, &dims) in shapes.iter().enumerate() {
            for (i, tiles) in [(64, 64), (48, 32)].into_iter().enumerate() {
                let seed = 13_000 + 10 * n as u64 + i as u64;
                // Soft-cap and sinks (bits 0 and 2 of `Mods::random`).
                let mut c = ModCase::random(seed, dims, tiles, false, 0b101);
                c.case.mask = Mask::full();
                c.case.dropout = (n != 2).then(|| Dropout::new(0.25, seed).unwrap());
                let before = maskattn::amx_model_column_tiles();
                c.check_half::<bf16>();
                let ran = maskattn::amx_model_column_tiles() - before;
                if mode == AmxMode::Model {
                    // Every (query tile, key tile) pair of the forward, none missed.
                    let [b, hq, _, lq, lk, _] = dims;
                    let want = b * hq * lq.div_ceil(tiles.0) * lk.div_ceil(tiles.1);
                    assert_eq!(ran as usize, want, "{dims:?} {tiles:?}: column-form tiles");
                }
                common::report(&format!(
                    "full_tiles_take_the_column_form_through_amx: {mode:?} {dims:?} \
                     tiles {tiles:?} {}: {ran} tiles in column form on AMX",
                    c.mods.names()
                ));
            }
        }
    });
}

/// A forward task (one query tile) configures the tiles once for all its products
/// (`ldtilecfg` counted by the model): `B·H_q·⌈L_q / t_q⌉` configurations for
/// `2 · B·H_q·⌈L_q / t_q⌉·⌈L_k / t_k⌉` products under a full mask.
#[test]
fn a_forward_task_configures_the_tiles_once() {
    for_each_amx_mode("a_forward_task_configures_the_tiles_once", |mode| {
        for (seed, dims, tiles) in [
            (1, [1, 4, 2, 97, 131, 40], (64, 64)),
            (2, [2, 3, 1, 70, 77, 24], (16, 32)),
        ] {
            let mut c = random_case(seed, dims, tiles, false).rounded::<bf16>();
            c.mask = Mask::full();
            let [b, hq, _, lq, lk, _] = dims;
            let q16: Vec<bf16> = c.q.iter().map(|&x| bf16::from_f32(x)).collect();
            let k16: Vec<bf16> = c.k.iter().map(|&x| bf16::from_f32(x)).collect();
            let v16: Vec<bf16> = c.v.iter().map(|&x| bf16::from_f32(x)).collect();
            let q = maskattn::View::bhld("q", &q16, c.q_shape()).unwrap();
            let k = maskattn::View::bhld("k", &k16, c.kv_shape()).unwrap();
            let v = maskattn::View::bhld("v", &v16, c.kv_shape()).unwrap();
            let (configs, products) = (
                maskattn::amx_model_configures(),
                maskattn::amx_model_products(),
            );
            maskattn::forward(&q, &k, &v, &c.block(), &Default::default()).unwrap();
            let configs = maskattn::amx_model_configures() - configs;
            let products = maskattn::amx_model_products() - products;
            common::report(&format!(
                "a_forward_task_configures_the_tiles_once: {mode:?} {dims:?} {tiles:?}: \
                 {configs} ldtilecfg for {products} products (model counts)"
            ));
            if mode == AmxMode::Model {
                let tasks = (b * hq * lq.div_ceil(tiles.0)) as u64;
                assert_eq!(configs, tasks, "{dims:?}: one configuration per task");
                assert_eq!(products, 2 * tasks * lk.div_ceil(tiles.1) as u64);
            }
        }
    });
}

/// Writes `bad` into every key and value element no query of the kv head's group may see.
fn poison(c: &mut Case, bad: f32) -> usize {
    let [b, hq, hkv, lq, lk, d] = c.dims;
    let s = MaskShape::new(b, hq, lq, lk);
    let group = hq / hkv;
    let mut n = 0;
    for bi in 0..b {
        for hk in 0..hkv {
            for j in 0..lk {
                let seen = (hk * group..(hk + 1) * group)
                    .any(|h| (0..lq).any(|i| c.mask.allowed(&s, bi, h, i, j)));
                if seen {
                    continue;
                }
                n += 1;
                for x in 0..d {
                    let idx = |layout: Layout| match layout {
                        Layout::Bhld => ((bi * hkv + hk) * lk + j) * d + x,
                        Layout::Blhd => ((bi * lk + j) * hkv + hk) * d + x,
                    };
                    let (ik, iv) = (idx(c.layouts[1]), idx(c.layouts[2]));
                    c.k[ik] = bad;
                    c.v[iv] = -bad;
                }
            }
        }
    }
    n
}

fn bits(v: &[Vec<f32>; 5]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

#[test]
fn hidden_nan_and_inf_change_nothing_through_amx() {
    for_each_amx_mode("hidden_nan_and_inf_change_nothing_through_amx", |_| {
        let mut rng = common::Rng::new(77);
        for case in 0..12u64 {
            let (b, hkv, group) = (1 + rng.below(2), 1 + rng.below(2), 1 + rng.below(2));
            let (lq, lk, d) = (1 + rng.below(70), 2 + rng.below(100), 1 + rng.below(70));
            let tiles = [(64, 64), (16, 16), (7, 13), (32, 20)][case as usize % 4];
            let mut c = random_case(case, [b, hkv * group, hkv, lq, lk, d], tiles, case % 3 == 0)
                .rounded::<bf16>();
            // Padding keys hide something from everyone; an odd number of them leaves a
            // visible key paired with a hidden one in the products' pairs.
            let lens: Vec<usize> = (0..b).map(|_| rng.below(lk)).collect();
            c.mask = c.mask.clone() & Mask::key_padding(lens);
            let clean = bits(&c.run_kernel_half::<bf16>());
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case as usize % 3];
            assert!(poison(&mut c, bad) >= b);
            assert!(
                clean == bits(&c.run_kernel_half::<bf16>()),
                "case {case}: {:?}",
                c.dims
            );
        }
    });
}

#[test]
fn rows_that_see_nothing_stay_zero_through_amx() {
    for_each_amx_mode("rows_that_see_nothing_stay_zero_through_amx", |_| {
        let dims = [2, 4, 2, 37, 29, 24];
        let mask = Mask::key_padding(vec![29, 0])
            & (Mask::causal_top_left() & !Mask::key_padding(vec![3]));
        let c = with_mask(random_case(7, dims, (16, 16), false), mask).rounded::<bf16>();
        let [out, lse, dq, dk, dv] = c.run_kernel_half::<bf16>();
        let [b, hq, hkv, lq, lk, d] = dims;
        for x in out.iter().chain(&lse).chain(&dq).chain(&dk).chain(&dv) {
            assert!(!x.is_nan(), "NaN in a result");
        }
        for bi in 0..b {
            for h in 0..hq {
                for i in 0..lq {
                    let row = (bi * hq + h) * lq + i;
                    if bi == 1 || i < 3 {
                        assert_eq!(lse[row], f32::NEG_INFINITY, "lse of empty row {row}");
                        assert!(out[row * d..(row + 1) * d].iter().all(|&x| x == 0.0));
                        assert!(dq[row * d..(row + 1) * d].iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
        let per_b = hkv * lk * d;
        assert!(dk[per_b..].iter().chain(&dv[per_b..]).all(|&x| x == 0.0));
        c.check_half::<bf16>();
    });
}

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn amx_results_do_not_depend_on_thread_count() {
    for_each_amx_mode("amx_results_do_not_depend_on_thread_count", |_| {
        for seed in 0..4 {
            let mut c = random_case(seed, [2, 6, 3, 97, 131, 20], (16, 32), seed % 2 == 0)
                .rounded::<bf16>();
            if seed == 3 {
                // Every tile full: the column form throughout, dropout included.
                c.mask = Mask::full();
                c.dropout = Some(Dropout::new(0.2, 9).unwrap());
            }
            let one = bits(&in_pool(1, || c.run_kernel_half::<bf16>()));
            for threads in [2, 3] {
                let many = bits(&in_pool(threads, || c.run_kernel_half::<bf16>()));
                assert!(one == many, "seed {seed}: {threads} threads differ from 1");
            }
        }
    });
}
