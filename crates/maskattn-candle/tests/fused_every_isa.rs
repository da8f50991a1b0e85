//! The fused ops on every instruction set this CPU can run: they dispatch through the kernel
//! crate's `Isa` (`maskattn::set_isa`, `MASKATTN_ISA`), each op's loops count their calls
//! per set (`fused::calls_on`), and forward and gradient match the candle ops they replace
//! on each set. In a process of its own because the choice is process-wide.

mod common;

use candle_core::{Result, Tensor, Var};
use common::{max_diff, tensor};
use maskattn::{set_isa, Isa};
use maskattn_candle::fused;

/// The calls counted so far on each set of `Isa::ALL`.
fn counts() -> [u64; 4] {
    Isa::ALL.map(fused::calls_on)
}

/// `y` and the gradient of `Σ y·w` for a weight `w` that varies element by element.
fn value_and_grad(x: &Var, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    let y = f(x.as_tensor())?;
    let w = ((tensor(y.dims(), 9)? / 4.0)? + 1.0)?;
    let g = (&y * &w)?.sum_all()?.backward()?;
    Ok((y, g.get(x).expect("gradient").clone()))
}

type Op = Box<dyn Fn(&Tensor) -> Result<Tensor>>;

/// Each fused op, with the candle ops it replaces (the plain reference) and how far the two
/// may differ (the approximations' stated errors, with room for f32 rounding).
fn ops() -> Result<Vec<(&'static str, Op, Op, f32)>> {
    let n = 250;
    let (w, b) = ((tensor(&[n], 2)? + 1.0)?, tensor(&[n], 3)?);
    let (w2, b2) = (w.clone(), b.clone());
    let lin_w = (tensor(&[n, n], 4)? / 16.0)?;
    let lin_b = tensor(&[n], 5)?;
    let (lin_w2, lin_b2) = (lin_w.clone(), lin_b.clone());
    let (lin_w3, lin_b3) = (lin_w.clone(), lin_b.clone());
    let (lin_w4, lin_b4) = (lin_w.clone(), lin_b.clone());
    // 256 rows of 250: over the size where the loops split across rayon's pool.
    let rows = 256;
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 37) % n as u32).collect();
    let weights: Vec<f32> = (0..rows).map(|i| 0.5 + (i % 3) as f32).collect();
    let (t2, wt2) = (targets.clone(), weights.clone());
    Ok(vec![
        (
            "gelu_erf",
            Box::new(fused::gelu_erf),
            Box::new(|x: &Tensor| x.gelu_erf()),
            1e-5,
        ),
        (
            "gelu_tanh",
            Box::new(fused::gelu_tanh),
            Box::new(|x: &Tensor| x.gelu()),
            1e-4,
        ),
        (
            "layer_norm",
            Box::new(move |x: &Tensor| fused::layer_norm(x, &w, &b, 1e-5)),
            Box::new(move |x: &Tensor| fused::layer_norm_ops(x, &w2, &b2, 1e-5)),
            1e-4,
        ),
        (
            "weighted_nll",
            Box::new(move |x: &Tensor| fused::weighted_nll(x, &targets, &weights)),
            Box::new(move |x: &Tensor| fused::weighted_nll_ops(x, &t2, &wt2)),
            1e-3,
        ),
        (
            "linear_gelu_tanh",
            Box::new(move |x: &Tensor| fused::linear_gelu_tanh(x, &lin_w, &lin_b)),
            Box::new(move |x: &Tensor| fused::linear_ops(x, &lin_w2, Some(&lin_b2))?.gelu()),
            1e-3,
        ),
        (
            "linear_gelu_erf",
            Box::new(move |x: &Tensor| fused::linear_gelu_erf(x, &lin_w3, &lin_b3)),
            Box::new(move |x: &Tensor| fused::linear_ops(x, &lin_w4, Some(&lin_b4))?.gelu_erf()),
            1e-3,
        ),
    ])
}

/// Runs every fused op on the set in use now and checks that its loops ran on `isa` (and on
/// no other set) and that it agrees with the candle ops it replaces.
fn check_every_op_on(isa: Isa) -> Result<()> {
    let slot = Isa::ALL.iter().position(|&i| i == isa).unwrap();
    for (name, fused_op, plain, tol) in ops()? {
        let x = Var::from_tensor(&(tensor(&[256, 250], 1)? * 3.0)?)?;
        let before = counts();
        let (y, dx) = value_and_grad(&x, &fused_op)?;
        let after = counts();
        // `linear_gelu_*` run only the GELU loops (the product is gemm's).
        assert!(
            after[slot] > before[slot],
            "{isa:?}: {name} ran no loop on {isa:?} ({before:?} → {after:?})"
        );
        for (i, other) in Isa::ALL.iter().enumerate() {
            if i != slot {
                assert_eq!(
                    after[i], before[i],
                    "{isa:?}: {name} ran a loop on {other:?}"
                );
            }
        }
        let (y_ref, dx_ref) = value_and_grad(&x, &plain)?;
        let scale =
            |t: &Tensor| -> Result<f32> { Ok(1f32.max(t.abs()?.max_all()?.to_scalar::<f32>()?)) };
        let (ey, ed) = (max_diff(&y, &y_ref), max_diff(&dx, &dx_ref));
        assert!(
            ey <= tol * scale(&y_ref)?,
            "{isa:?}: {name} forward differs from the candle ops by {ey:e}"
        );
        assert!(
            ed <= tol * scale(&dx_ref)?,
            "{isa:?}: {name} gradient differs from the candle ops by {ed:e}"
        );
    }
    Ok(())
}

#[test]
fn the_fused_ops_run_on_every_set_set_isa_chooses() -> Result<()> {
    let available = Isa::available();
    for isa in Isa::ALL {
        if !available.contains(&isa) {
            println!("fused_every_isa: SKIPPED {isa:?} (this CPU lacks it)");
            assert_eq!(
                set_isa(Some(isa)),
                Err(isa),
                "a set the CPU lacks is refused"
            );
            continue;
        }
        set_isa(Some(isa)).unwrap();
        // On aarch64 the fused loops are the portable copy, vectorised for NEON by the
        // compiler: they count under the set in use, `Neon`.
        println!("fused_every_isa: ran {isa:?}");
        check_every_op_on(isa)?;
    }
    set_isa(None).unwrap();
    Ok(())
}

/// Set by the parent run of [`maskattn_isa_reaches_the_fused_ops`] in the process it starts.
const CHILD: &str = "MASKATTN_FUSED_ISA_CHILD";

/// `MASKATTN_ISA=avx2` (read once, when the first call picks the set) forces the fused ops
/// onto AVX2 as it does the kernels: this test starts itself again, in a fresh process with
/// the variable set, and that run checks the counts.
#[test]
fn maskattn_isa_reaches_the_fused_ops() -> Result<()> {
    if std::env::var_os(CHILD).is_some() {
        assert_eq!(std::env::var("MASKATTN_ISA").as_deref(), Ok("avx2"));
        assert_eq!(maskattn::current_isa(), Isa::Avx2);
        return check_every_op_on(Isa::Avx2);
    }
    if !Isa::available().contains(&Isa::Avx2) {
        println!("fused_every_isa: SKIPPED MASKATTN_ISA=avx2 (this CPU lacks AVX2+FMA)");
        return Ok(());
    }
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "maskattn_isa_reaches_the_fused_ops",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("MASKATTN_ISA", "avx2")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the MASKATTN_ISA=avx2 run failed:\n{text}"
    );
    // The child ran the test (a filter that matched nothing would also succeed).
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    println!("fused_every_isa: MASKATTN_ISA=avx2 put every fused op on Avx2");
    Ok(())
}
