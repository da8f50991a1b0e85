//! The mask grammar: `Display` and `FromStr` round-trip, precedence is `!` over `&` over `|`,
//! data terms are bound by the caller, and no input — random bytes, random token soups,
//! 14,000-term chains, deep parentheses — panics or overflows the stack.

use maskattn::{AttnError, Mask, MaskExpr, MaskShape};
use proptest::prelude::*;

fn parse(s: &str) -> Mask {
    s.parse::<Mask>().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn syntax_error(s: &str) -> String {
    match s.parse::<Mask>() {
        Err(e @ AttnError::MaskSyntax { .. }) => e.to_string(),
        Err(e) => panic!("{s:?}: not a syntax error: {e}"),
        Ok(m) => panic!("{s:?} parsed as {m}"),
    }
}

#[test]
fn every_structured_term_parses_to_its_constructor() {
    let cases = [
        ("full", Mask::full()),
        ("causal", Mask::causal()),
        ("causal-top-left", Mask::causal_top_left()),
        ("window( 3 , 0 )", Mask::window(3, 0)),
        ("chunks(64)", Mask::chunks(64)),
        ("block-causal(16)", Mask::block_causal(16)),
        ("neighbourhood(8, 4,1)", Mask::neighbourhood(8, 4, 1)),
        ("prefix(2)", Mask::prefix(2)),
        ("prefix(2,5)", Mask::prefix_per_batch(vec![2, 5])),
        (
            "window(18446744073709551615,0)",
            Mask::window(usize::MAX, 0),
        ),
    ];
    for (text, want) in cases {
        assert!(parse(text) == want, "{text}: {}", parse(text));
    }
}

#[test]
fn not_binds_tightest_then_and_then_or() {
    let (c, w, p) = (Mask::causal(), Mask::window(3, 3), Mask::prefix(8));
    let want = c.clone() & !(w.clone() | p.clone());
    assert!(parse("causal & !(window(3,3) | prefix(8))") == want);
    assert!(parse("causal & !window(3,3) | prefix(8)") == ((c.clone() & !w.clone()) | p.clone()));
    assert!(parse("causal | window(3,3) & prefix(8)") == (c.clone() | (w.clone() & p.clone())));
    assert!(parse("!causal & window(3,3)") == (!c.clone() & w.clone()));
    assert!(parse("!!causal") == c);
    assert!(parse("((causal))") == c);
    // And the meaning, pair by pair, against the definition written out.
    let s = MaskShape::new(1, 1, 20, 20);
    let m = parse("causal & !(window(3,3) | chunks(8))");
    for i in 0..20usize {
        for j in 0..20 {
            let want = j <= i && !(i.abs_diff(j) <= 3 || i / 8 == j / 8);
            assert_eq!(m.allowed(&s, 0, 0, i, j), want, "({i},{j})");
        }
    }
}

#[test]
fn display_and_debug_spell_masks_one_way() {
    let m = Mask::neighbourhood(8, 4, 1) & (Mask::causal() | !Mask::block_causal(3));
    assert_eq!(
        m.to_string(),
        "neighbourhood(8,4,1) & (causal | !block-causal(3))"
    );
    assert_eq!(format!("{m:?}"), m.to_string());
    assert_eq!(
        (!(Mask::causal() & Mask::full())).to_string(),
        "!(causal & full)"
    );
    // Data terms print their name; Debug adds a summary of the data.
    let k = Mask::causal() & Mask::key_padding(vec![5, 7]);
    assert_eq!(k.to_string(), "causal & key-padding");
    assert_eq!(format!("{k:?}"), "causal & key-padding[lengths [5, 7]]");
}

#[test]
fn data_terms_are_bound_by_the_caller() {
    let keys = Mask::key_padding(vec![3]);
    let m = Mask::parse_with("causal & !key-padding | documents", |name| {
        (name == "key-padding").then(|| keys.clone())
    });
    let e = m.unwrap_err().to_string();
    assert!(e.contains("`documents` is a data term"), "{e}");
    assert!(e.contains("at byte 24"), "{e}");
    let m = Mask::parse_with("causal & !key-padding", |name| {
        (name == "key-padding").then(|| keys.clone())
    })
    .unwrap();
    assert!(m == (Mask::causal() & !keys.clone()));

    let e = syntax_error("causal & key-padding");
    assert!(e.contains("`key-padding` is a data term"), "{e}");
    let e = syntax_error("causal & sideways");
    assert!(e.contains("unknown mask term `sideways`"), "{e}");

    let expr = MaskExpr::parse("dense | (documents & !dense)").unwrap();
    let names: Vec<&str> = expr.data_terms().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["dense", "documents", "dense"]);
    let bound: Result<Mask, String> = expr.bind(|n| Err(format!("no {n}")));
    assert_eq!(bound.unwrap_err(), "no dense");
}

#[test]
fn bad_expressions_are_typed_errors_that_say_what_is_wrong() {
    for (expr, word) in [
        ("casual", "unknown mask term `casual`"),
        ("window(3)", "two numbers"),
        ("window(3,-1)", "not a non-negative integer"),
        (
            "window(3,18446744073709551616)",
            "larger than the largest size",
        ),
        ("prefix", "expected prefix(...)"),
        ("chunks(0)", "at least 1"),
        ("block-causal(2,3)", "one number"),
        ("neighbourhood(8,8)", "a grid and a radius"),
        ("neighbourhood(0,8,1)", "at least 1"),
        ("causal(3)", "takes no numbers"),
        ("sideways(3)", "unknown mask term `sideways(3)`"),
        ("causal &", "found the end"),
        ("", "found the end"),
        ("causal causal", "unexpected `c`"),
        ("(causal", "never closed"),
        ("causal)", "unexpected `)`"),
        ("window(1,2", "never closed"),
        ("causal & é", "unexpected `é`"),
        ("& causal", "unexpected `&`"),
    ] {
        let e = syntax_error(expr);
        assert!(e.contains(word), "{expr:?}: {e}");
    }
}

/// Driven by the crate's one list of terms, so a new kind is covered the day it is listed:
/// each structured term builds from its numbers, prints as the grammar writes it, parses
/// back (alone and inside a tree), and refuses the wrong count of numbers; each data term
/// is what some mask with data prints, and a bare parse asks the caller for its data.
#[test]
fn every_term_of_the_list_prints_and_parses_back() {
    use maskattn::{DenseMask, MaskTerm, MASK_TERMS};
    for t in MASK_TERMS {
        assert!(MaskTerm::find(t.name).is_some_and(|f| f.name == t.name));
        if t.is_data() {
            let e = syntax_error(t.name);
            assert!(e.contains(&format!("`{}` is a data term", t.name)), "{e}");
            assert!(Mask::term(t.name, &[]).is_err(), "{}", t.name);
            continue;
        }
        // Small numbers that fit: the grid masks need a kernel or window that fits the grid.
        let args: Vec<usize> = match t.name {
            "natten" => vec![7, 9, 3, 2],
            "swin" => vec![8, 12, 4, 2],
            _ => (0..t.params.len()).map(|n| n + 2).collect(),
        };
        let required = t.params.len() - t.optional;
        let mut sets = vec![args.clone()];
        if t.repeats {
            sets.push([args.clone(), vec![9]].concat());
        }
        if t.optional > 0 {
            sets.push(args[..required].to_vec());
        }
        for args in sets {
            let m = Mask::term(t.name, &args).unwrap_or_else(|e| panic!("{}: {e}", t.name));
            let text = m.to_string();
            let nums: Vec<String> = args.iter().map(usize::to_string).collect();
            let want = if args.is_empty() {
                t.name.to_string()
            } else {
                format!("{}({})", t.name, nums.join(","))
            };
            assert_eq!(text, want);
            assert!(parse(&text) == m, "{text}");
            let tree = Mask::causal() & !(m.clone() | Mask::window(1, 2));
            assert!(parse(&tree.to_string()) == tree, "{tree}");
            // One number fewer than it needs is refused; one more, unless it repeats.
            if let Some((_, fewer)) = args.split_last().filter(|_| args.len() == required) {
                assert!(Mask::term(t.name, fewer).is_err(), "{}({fewer:?})", t.name);
            }
            if !t.repeats && args.len() == t.params.len() {
                let more = [args.clone(), vec![1]].concat();
                assert!(Mask::term(t.name, &more).is_err(), "{}({more:?})", t.name);
            }
        }
        assert!(t.usage().starts_with(t.name));
        assert_eq!(
            t.usage().matches(',').count() + 1,
            t.params.len().max(1) + t.repeats as usize
        );
    }
    // Every mask that carries data prints as a data term of the list, and every data term
    // of the list is printed by one.
    let dense = DenseMask::new(vec![true; 4], [1, 1, 2, 2]).unwrap();
    let with_data = [
        Mask::key_padding(vec![3]),
        Mask::key_keep(vec![true, false], 1),
        Mask::query_padding(vec![3]),
        Mask::documents(vec![0i64, 1], 1),
        Mask::dense(dense),
        Mask::from_fn(|_, _, i, j| i >= j),
        Mask::per_head(vec![Mask::causal()]),
    ];
    let printed: Vec<String> = with_data.iter().map(Mask::to_string).collect();
    for p in &printed {
        assert!(MaskTerm::find(p).is_some_and(MaskTerm::is_data), "{p}");
    }
    for t in MASK_TERMS.iter().filter(|t| t.is_data()) {
        assert!(printed.iter().any(|p| p == t.name), "{}", t.name);
    }
    let e = Mask::term("sideways", &[1]).unwrap_err().to_string();
    assert!(e.contains("unknown mask term `sideways`"), "{e}");
    let e = Mask::term("causal", &[1]).unwrap_err().to_string();
    assert!(e.contains("takes no numbers"), "{e}");
}

/// One structured leaf, any sizes (the extremes included).
fn leaf() -> impl Strategy<Value = Mask> {
    let size = prop_oneof![
        0usize..100,
        Just(usize::MAX),
        Just(usize::MAX / 2 + 1),
        any::<usize>()
    ];
    let positive = prop_oneof![1usize..100, Just(usize::MAX), 1usize..];
    prop_oneof![
        Just(Mask::full()),
        Just(Mask::causal()),
        Just(Mask::causal_top_left()),
        (size.clone(), size.clone()).prop_map(|(l, r)| Mask::window(l, r)),
        positive.clone().prop_map(Mask::chunks),
        positive.clone().prop_map(Mask::block_causal),
        (positive.clone(), positive, size.clone())
            .prop_map(|(h, w, r)| Mask::neighbourhood(h, w, r)),
        size.clone().prop_map(Mask::prefix),
        proptest::collection::vec(size, 2..4).prop_map(Mask::prefix_per_batch),
    ]
}

/// Structured masks composed with `&`, `|` and `!`, a few levels deep.
fn structured() -> impl Strategy<Value = Mask> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a & b),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| a | b),
            inner.prop_map(|a| !a),
        ]
    })
}

/// Pieces of the grammar and near misses, for token soups.
const TOKENS: [&str; 24] = [
    "causal",
    "full",
    "causal-top-left",
    "window(",
    "chunks(",
    "block-causal(",
    "neighbourhood(",
    "prefix(",
    "key-padding",
    "documents",
    "(",
    ")",
    "&",
    "|",
    "!",
    ",",
    "3",
    "0",
    "18446744073709551615",
    "18446744073709551616",
    " ",
    "-",
    "x",
    "é",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn display_then_parse_gives_the_mask_back(m in structured()) {
        let text = m.to_string();
        let back: Mask = text.parse().map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert!(back == m, "{} came back as {}", text, back);
        prop_assert_eq!(format!("{m:?}"), text);
    }

    /// Random bytes never panic; whatever parses prints to text that parses to the same.
    #[test]
    fn random_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(m) = text.parse::<Mask>() {
            prop_assert!(m.to_string().parse::<Mask>().unwrap() == m);
        }
    }

    #[test]
    fn random_token_sequences_parse_or_fail_cleanly(
        picks in proptest::collection::vec(0..TOKENS.len(), 0..40)
    ) {
        let text: String = picks.iter().map(|&p| TOKENS[p]).collect();
        match Mask::parse_with(&text, |name| match name {
            "key-padding" => Some(Mask::key_padding(vec![2])),
            "documents" => Some(Mask::documents(vec![0i64, 1], 1)),
            _ => None,
        }) {
            Ok(m) => {
                let again = m.to_string();
                let back = Mask::parse_with(&again, |name| match name {
                    "key-padding" => Some(Mask::key_padding(vec![2])),
                    "documents" => Some(Mask::documents(vec![0i64, 1], 1)),
                    _ => None,
                }).unwrap();
                prop_assert!(back == m, "{} -> {} -> {}", text, again, back);
            }
            Err(e) => prop_assert!(matches!(e, AttnError::MaskSyntax { .. }), "{}", e),
        }
    }
}

/// Runs `f` on a thread with a small stack, as rayon's workers and test threads have.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn long_expressions_parse_without_recursion() {
    on_small_stack(|| {
        let n = 14_000;
        let chain = vec!["causal"; n].join(" & ");
        let m = parse(&chain);
        assert_eq!(m.depth(), 2);
        assert!(m.to_string() == chain);
        let ors = vec!["!window(3,3)"; n].join(" | ");
        assert_eq!(parse(&ors).depth(), 3);
        let nots = format!("{}causal", "!".repeat(n + 1));
        assert!(parse(&nots) == !Mask::causal());
        let parens = format!("{}causal{}", "(".repeat(n), ")".repeat(n));
        let e = syntax_error(&parens);
        assert!(e.contains("nested more than"), "{e}");
        let ok = format!(
            "{}causal{}",
            "(".repeat(Mask::MAX_DEPTH),
            ")".repeat(Mask::MAX_DEPTH)
        );
        assert!(parse(&ok) == Mask::causal());
        // Alternating operators nest: the deepest expression the parser reads binds and
        // then fails validation with a typed error, on a small stack throughout.
        let d = Mask::MAX_DEPTH;
        let alternating = format!(
            "{}causal{}",
            "!(causal & (window(1,1) | ".repeat(d / 2),
            "))".repeat(d / 2)
        );
        let m = parse(&alternating);
        assert!(m.depth() > Mask::MAX_DEPTH);
        let e = maskattn::BlockMask::new(&m, MaskShape::new(1, 1, 4, 4)).unwrap_err();
        assert!(matches!(e, AttnError::MaskTooDeep { .. }), "{e}");
        assert!(m.to_string().parse::<Mask>().unwrap() == m);
    });
}
