//! The `--mask EXPR` language shared by the subcommands: `full`, or terms joined by `&`:
//! `causal`, `causal-top-left`, `window(LEFT,RIGHT)`, `chunks(C)`, `block-causal(C)`,
//! `neighbourhood(H,W,R)`, `key-padding`, `documents`, `prefix(P)`, `dense`. `key-padding`, `documents` and `dense`
//! read their data from tensors the caller has.

use anyhow::{bail, Context, Result};
use maskattn::Mask;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Full,
    Causal,
    CausalTopLeft,
    Window(usize, usize),
    Chunks(usize),
    BlockCausal(usize),
    Neighbourhood(usize, usize, usize),
    KeyPadding,
    Documents,
    Prefix(usize),
    Dense,
}

pub const SYNTAX: &str = "full, or an &-joined list of: causal, causal-top-left, \
window(LEFT,RIGHT), chunks(C), block-causal(C), neighbourhood(H,W,R), key-padding, documents, prefix(P), dense";

pub fn parse(expr: &str) -> Result<Vec<Term>> {
    let terms = expr
        .split('&')
        .map(|t| parse_term(t.trim()).with_context(|| format!("in --mask {expr:?}")))
        .collect::<Result<Vec<_>>>()?;
    if terms.len() > 1 && terms.contains(&Term::Full) {
        bail!("--mask {expr:?}: `full` cannot be combined with other terms");
    }
    Ok(terms)
}

fn parse_term(t: &str) -> Result<Term> {
    let args = |name: &str| -> Result<Option<Vec<usize>>> {
        let Some(rest) = t.strip_prefix(name) else {
            return Ok(None);
        };
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .with_context(|| format!("`{t}`: expected {name}(...)"))?;
        inner
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .with_context(|| format!("`{t}`: `{}` is not a non-negative integer", x.trim()))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    Ok(match t {
        "full" => Term::Full,
        "causal" => Term::Causal,
        "causal-top-left" => Term::CausalTopLeft,
        "key-padding" => Term::KeyPadding,
        "documents" => Term::Documents,
        "dense" => Term::Dense,
        _ => {
            if let Some(a) = args("window")? {
                match a[..] {
                    [l, r] => Term::Window(l, r),
                    _ => bail!("`{t}`: window takes two numbers, window(LEFT,RIGHT)"),
                }
            } else if let Some(a) = args("chunks")? {
                Term::Chunks(chunk_size(t, &a)?)
            } else if let Some(a) = args("block-causal")? {
                Term::BlockCausal(chunk_size(t, &a)?)
            } else if let Some(a) = args("neighbourhood")? {
                match a[..] {
                    [h, w, r] if h > 0 && w > 0 => Term::Neighbourhood(h, w, r),
                    _ => bail!("`{t}`: neighbourhood takes a grid and a radius, neighbourhood(HEIGHT,WIDTH,RADIUS), HEIGHT and WIDTH at least 1"),
                }
            } else if let Some(a) = args("prefix")? {
                match a[..] {
                    [p] => Term::Prefix(p),
                    _ => bail!("`{t}`: prefix takes one number, prefix(P)"),
                }
            } else {
                bail!("unknown mask term `{t}`; expected {SYNTAX}")
            }
        }
    })
}

fn chunk_size(t: &str, a: &[usize]) -> Result<usize> {
    match a {
        [c] if *c > 0 => Ok(*c),
        [_] => bail!("`{t}`: the chunk size must be at least 1"),
        _ => bail!("`{t}`: takes one number, the chunk size"),
    }
}

/// The data that the data-carrying terms read, provided on demand by the caller.
pub trait MaskData {
    fn key_lengths(&self) -> Result<Mask>;
    fn documents(&self) -> Result<Mask>;
    fn dense(&self) -> Result<Mask>;
}

/// Builds the conjunction of `terms`.
pub fn build(terms: &[Term], data: &dyn MaskData) -> Result<Mask> {
    let mut mask: Option<Mask> = None;
    for t in terms {
        let m = match t {
            Term::Full => Mask::full(),
            Term::Causal => Mask::causal(),
            Term::CausalTopLeft => Mask::causal_top_left(),
            Term::Window(l, r) => Mask::window(*l, *r),
            Term::Chunks(c) => Mask::chunks(*c),
            Term::BlockCausal(c) => Mask::block_causal(*c),
            Term::Neighbourhood(h, w, r) => Mask::neighbourhood(*h, *w, *r),
            Term::KeyPadding => data.key_lengths()?,
            Term::Documents => data.documents()?,
            Term::Prefix(p) => Mask::prefix(*p),
            Term::Dense => data.dense()?,
        };
        mask = Some(match mask {
            None => m,
            Some(acc) => acc & m,
        });
    }
    Ok(mask.unwrap_or(Mask::Full))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_term_with_spaces() {
        let t =
            parse("causal & window( 3 , 0 )&key-padding & documents & prefix(2) & dense").unwrap();
        assert_eq!(
            t,
            vec![
                Term::Causal,
                Term::Window(3, 0),
                Term::KeyPadding,
                Term::Documents,
                Term::Prefix(2),
                Term::Dense
            ]
        );
        assert_eq!(parse("full").unwrap(), vec![Term::Full]);
        assert_eq!(parse("causal-top-left").unwrap(), vec![Term::CausalTopLeft]);
        assert_eq!(
            parse("causal & chunks(64)&block-causal( 16 ) & neighbourhood(8, 4,1)").unwrap(),
            vec![
                Term::Causal,
                Term::Chunks(64),
                Term::BlockCausal(16),
                Term::Neighbourhood(8, 4, 1)
            ]
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
            ("full & causal", "cannot be combined"),
            ("causal &", "unknown mask term ``"),
        ] {
            let e = format!("{:#}", parse(expr).unwrap_err());
            assert!(e.contains(word), "{expr}: {e}");
        }
    }
}
