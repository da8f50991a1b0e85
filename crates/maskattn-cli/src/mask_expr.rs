//! `--mask EXPR` for the subcommands: the kernel crate's mask grammar
//! ([`maskattn::MaskExpr`]), with the data terms this program knows bound to data the
//! caller has. This file only binds them; the grammar lives in one place.

use anyhow::{bail, Context, Result};
use maskattn::{Mask, MaskExpr};

/// The one help text of `--mask`, for every subcommand that takes it: the structured
/// terms come from the kernel crate's list, the data terms are those this program binds.
pub fn syntax() -> String {
    format!(
        "terms combined with & (and), | (or), ! (not) and parentheses; ! binds tightest, \
then &, then |. Terms: {}, and the data terms {}. \
Example: \"causal & !(window(3,3) | prefix(8))\"",
        maskattn::structured_terms(),
        DATA.join(", ")
    )
}

/// The data terms this program can bind.
const DATA: [&str; 3] = ["key-padding", "documents", "dense"];

/// Parses `expr`; unknown terms are reported now, before any data is read.
pub fn parse(expr: &str) -> Result<MaskExpr> {
    let parsed = MaskExpr::parse(expr).with_context(|| format!("in --mask {expr:?}"))?;
    if let Some((name, at)) = parsed
        .data_terms()
        .into_iter()
        .find(|(n, _)| !DATA.contains(n))
    {
        bail!(
            "in --mask {expr:?}, at byte {at}: unknown mask term `{name}`; expected {}",
            syntax()
        );
    }
    Ok(parsed)
}

/// The data that the data terms read, provided on demand by the caller.
pub trait MaskData {
    fn key_padding(&self) -> Result<Mask>;
    fn documents(&self) -> Result<Mask>;
    fn dense(&self) -> Result<Mask>;
}

/// The mask of `expr`, its data terms bound to `data`.
pub fn build(expr: &MaskExpr, data: &dyn MaskData) -> Result<Mask> {
    expr.bind(|name| match name {
        "key-padding" => data.key_padding(),
        "documents" => data.documents(),
        "dense" => data.dense(),
        _ => unreachable!("parse admits only the data terms in DATA"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Data;
    impl MaskData for Data {
        fn key_padding(&self) -> Result<Mask> {
            Ok(Mask::key_padding(vec![3]))
        }
        fn documents(&self) -> Result<Mask> {
            Ok(Mask::documents(vec![0i64, 0, 1, 1], 1))
        }
        fn dense(&self) -> Result<Mask> {
            bail!("no dense mask here")
        }
    }

    fn mask(expr: &str) -> Mask {
        build(&parse(expr).unwrap(), &Data).unwrap()
    }

    #[test]
    fn parses_every_term_with_spaces() {
        let m = mask("causal & window( 3 , 0 )&key-padding & documents & prefix(2)");
        let want = Mask::causal()
            & Mask::window(3, 0)
            & Mask::key_padding(vec![3])
            & Mask::documents(vec![0i64, 0, 1, 1], 1)
            & Mask::prefix(2);
        assert!(m == want, "{m:?}");
        assert!(mask("full") == Mask::full());
        assert!(mask("causal-top-left") == Mask::causal_top_left());
        assert!(
            mask("causal & chunks(64)&block-causal( 16 ) & neighbourhood(8, 4,1)")
                == Mask::causal()
                    & Mask::chunks(64)
                    & Mask::block_causal(16)
                    & Mask::neighbourhood(8, 4, 1)
        );
        assert!(
            mask("causal & !(window(3,3) | key-padding)")
                == Mask::causal() & !(Mask::window(3, 3) | Mask::key_padding(vec![3]))
        );
    }

    #[test]
    fn rejects_bad_terms_with_a_message() {
        for (expr, word) in [
            ("casual", "unknown mask term"),
            ("window(3)", "two numbers"),
            ("window(3,-1)", "not a non-negative integer"),
            ("prefix", "expected prefix(...)"),
            ("chunks(0)", "at least 1"),
            ("block-causal(2,3)", "one number"),
            ("neighbourhood(8,8)", "a grid and a radius"),
            ("neighbourhood(0,8,1)", "at least 1"),
            ("causal &", "expected a mask term, found the end"),
            ("fn & causal", "unknown mask term `fn`"),
        ] {
            let e = format!("{:#}", parse(expr).unwrap_err());
            assert!(e.contains(word), "{expr}: {e}");
            assert!(e.contains("--mask"), "{expr}: {e}");
        }
        let e = build(&parse("causal | dense").unwrap(), &Data).unwrap_err();
        assert!(e.to_string().contains("no dense mask here"), "{e}");
    }

    #[test]
    fn the_help_text_names_every_term_of_the_grammar() {
        let help = syntax();
        for term in maskattn::MASK_TERMS {
            // Every structured term, as the grammar writes it; the data terms this program
            // binds. (`fn`, `per-head` and `query-padding` have no input to read here.)
            if !term.is_data() || DATA.contains(&term.name) {
                assert!(help.contains(&term.usage()), "{}", term.usage());
            }
        }
        for name in DATA {
            let term = maskattn::MaskTerm::find(name).expect("a term of the grammar");
            assert!(term.is_data(), "{name}");
        }
    }
}
