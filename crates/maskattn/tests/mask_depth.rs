//! Deep masks: a long chain of one operator is flat (evaluated, classified, printed, cloned
//! and dropped without recursion through it), and nesting past `Mask::MAX_DEPTH` is a
//! typed error, never a stack overflow.

use maskattn::{AttnError, BlockMask, Mask, MaskShape};

/// Runs `f` on a thread with a small stack, as rayon's workers and test threads have.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

const TERMS: usize = 100_000;

#[test]
fn a_long_and_chain_built_in_rust_does_not_overflow() {
    on_small_stack(|| {
        let s = MaskShape::new(1, 1, 20, 20);
        // Left-deep, as `a & b & c & …` associates, and right-deep, as a fold from the right.
        let mut left = Mask::causal();
        let mut right = Mask::causal();
        for n in 0..TERMS {
            left = left & Mask::window(TERMS - n, 5);
            right = Mask::window(TERMS - n, 5) & right;
        }
        for m in [&left, &right] {
            let bm = BlockMask::new(m, s).unwrap();
            // causal & window(1, 5) & … : causal with a left window of 1.
            let want = BlockMask::new(&(Mask::causal() & Mask::window(1, 0)), s).unwrap();
            assert_eq!(bm.stats(), want.stats());
            assert!(m.allowed(&s, 0, 0, 5, 4) && !m.allowed(&s, 0, 0, 5, 3));
            let text = format!("{m:?}");
            assert_eq!(text.matches('&').count(), TERMS);
            let copy = m.clone();
            drop(copy);
        }
        let mut any = Mask::full();
        for n in 0..TERMS {
            any = any | !Mask::window(n, n);
        }
        assert!(any.allowed(&s, 0, 0, 3, 7));
        drop((left, right, any));
    });
}

#[test]
fn a_deeply_nested_mask_is_a_typed_error_and_still_drops() {
    on_small_stack(|| {
        // Alternating operators cannot be flattened: each level nests.
        let mut m = Mask::causal();
        for n in 0..TERMS {
            m = if n % 2 == 0 {
                m & Mask::window(n, 1)
            } else {
                !(m | Mask::chunks(n + 1))
            };
        }
        let e = BlockMask::new(&m, MaskShape::new(1, 1, 8, 8)).unwrap_err();
        assert!(
            matches!(e, AttnError::MaskTooDeep { max, .. } if max == Mask::MAX_DEPTH),
            "{e}"
        );
        let text = format!("{m}");
        assert!(text.len() > TERMS, "printing needs no recursion");
        let copy = m.clone();
        assert!(copy == m, "comparing needs no recursion");
        drop(copy);
        drop(m);
    });
}

#[test]
fn nesting_up_to_the_limit_compiles() {
    on_small_stack(|| {
        let s = MaskShape::new(1, 1, 8, 8);
        let mut m = Mask::causal();
        // Each step nests one `!` around one `&` / `|`: two levels.
        while {
            let deeper = !(m.clone() & Mask::window(3, 3));
            let ok = BlockMask::new(&deeper, s).is_ok();
            if ok {
                m = deeper;
            }
            ok
        } {}
        let e = BlockMask::new(&(!(m.clone() & Mask::full())), s).unwrap_err();
        assert!(matches!(e, AttnError::MaskTooDeep { .. }), "{e}");
        BlockMask::new(&m, s).unwrap();
    });
}

#[test]
fn extending_a_shared_chain_leaves_the_original_as_it_was() {
    let a = Mask::causal() & Mask::window(3, 0);
    let b = a.clone() & Mask::prefix(2);
    let c = Mask::chunks(4) & a.clone();
    let d = a.clone() & b.clone();
    assert_eq!(a.to_string(), "causal & window(3,0)");
    assert_eq!(b.to_string(), "causal & window(3,0) & prefix(2)");
    assert_eq!(c.to_string(), "chunks(4) & causal & window(3,0)");
    assert_eq!(
        d.to_string(),
        "causal & window(3,0) & causal & window(3,0) & prefix(2)"
    );
    let n = !a.clone();
    assert!(!n.clone() == a, "!!a is a");
    assert_eq!(n.to_string(), "!(causal & window(3,0))");
    assert_eq!((a.clone() | n.clone()).depth(), 4);
}
