//! The one list of mask terms: every name the grammar knows, the numbers it takes, a line of
//! help, and (for a structured term) how to build it.
//!
//! The parser ([`crate::MaskExpr`]), the command line's help text and the Python bindings
//! all read their vocabulary from [`MASK_TERMS`], so a new structured kind is a variant in
//! `mask.rs`, its evaluation and classification, its `Display`, and one entry here —
//! nothing outside this crate is edited by hand.

use crate::error::{AttnError, Result};
use crate::mask::Mask;

/// Builds a structured term's mask from its numbers, or says why they do not fit.
pub type BuildTerm = fn(&[usize]) -> std::result::Result<Mask, String>;

/// One term of the mask grammar.
#[derive(Clone, Copy, Debug)]
pub struct MaskTerm {
    /// Its name in the grammar (`block-causal`); the Python package spells it with `_`.
    pub name: &'static str,
    /// The numbers it takes, in order, named for help texts (`["LEFT", "RIGHT"]`). Empty for
    /// a term without numbers and for a data term.
    pub params: &'static [&'static str],
    /// Whether more numbers like the last may follow (`prefix(P,P,…)`: one per batch row).
    pub repeats: bool,
    /// One line saying what it does.
    pub doc: &'static str,
    /// Builds the mask from its numbers, or says why they do not fit; `None` for a data
    /// term, whose data the text cannot carry and the caller binds ([`crate::MaskExpr::bind`]).
    pub build: Option<BuildTerm>,
}

impl MaskTerm {
    /// Whether the caller supplies this term's data.
    pub fn is_data(&self) -> bool {
        self.build.is_none()
    }

    /// How the grammar writes it, numbers by name: `window(LEFT,RIGHT)`, `prefix(P[,P…])`.
    pub fn usage(&self) -> String {
        if self.params.is_empty() {
            return self.name.to_string();
        }
        let more = if self.repeats {
            format!("[,{}…]", self.params[self.params.len() - 1])
        } else {
            String::new()
        };
        format!("{}({}{more})", self.name, self.params.join(","))
    }

    /// The term called `name`.
    pub fn find(name: &str) -> Option<&'static MaskTerm> {
        MASK_TERMS.iter().find(|t| t.name == name)
    }
}

/// Every term of the grammar: the structured ones first, then the data terms.
pub const MASK_TERMS: &[MaskTerm] = &[
    MaskTerm {
        name: "full",
        params: &[],
        repeats: false,
        doc: "every query sees every key",
        build: Some(|_| Ok(Mask::full())),
    },
    MaskTerm {
        name: "causal",
        params: &[],
        repeats: false,
        doc: "j ≤ i + (L_k − L_q): causal, bottom-right aligned (the last query sees the last key)",
        build: Some(|_| Ok(Mask::causal())),
    },
    MaskTerm {
        name: "causal-top-left",
        params: &[],
        repeats: false,
        doc: "j ≤ i: causal, top-left aligned (PyTorch's is_causal when L_q ≠ L_k)",
        build: Some(|_| Ok(Mask::causal_top_left())),
    },
    MaskTerm {
        name: "window",
        params: &["LEFT", "RIGHT"],
        repeats: false,
        doc: "i' − LEFT ≤ j ≤ i' + RIGHT with i' = i + (L_k − L_q): a sliding window",
        build: Some(|a| match a {
            [l, r] => Ok(Mask::window(*l, *r)),
            _ => Err("window takes two numbers, window(LEFT,RIGHT)".into()),
        }),
    },
    MaskTerm {
        name: "chunks",
        params: &["C"],
        repeats: false,
        doc: "⌊j/C⌋ = ⌊i'/C⌋: local attention in fixed chunks of C positions",
        build: Some(|a| chunk_size(a).map(Mask::chunks)),
    },
    MaskTerm {
        name: "block-causal",
        params: &["C"],
        repeats: false,
        doc: "⌊j/C⌋ ≤ ⌊i'/C⌋: a query's whole chunk of C positions and every earlier one",
        build: Some(|a| chunk_size(a).map(Mask::block_causal)),
    },
    MaskTerm {
        name: "neighbourhood",
        params: &["HEIGHT", "WIDTH", "RADIUS"],
        repeats: false,
        doc: "positions on a HEIGHT × WIDTH grid in raster order; rows and columns at most RADIUS apart",
        build: Some(|a| match a {
            [h, w, r] if *h > 0 && *w > 0 => Ok(Mask::neighbourhood(*h, *w, *r)),
            _ => Err("neighbourhood takes a grid and a radius, \
                 neighbourhood(HEIGHT,WIDTH,RADIUS), HEIGHT and WIDTH at least 1"
                .into()),
        }),
    },
    MaskTerm {
        name: "prefix",
        params: &["P"],
        repeats: true,
        doc: "prefix-LM: j < P or causal; one P for every batch row, or one per row",
        build: Some(|a| match a {
            [] => Err("prefix takes one number, or one per batch row".into()),
            [p] => Ok(Mask::prefix(*p)),
            _ => Ok(Mask::prefix_per_batch(a.to_vec())),
        }),
    },
    MaskTerm {
        name: "key-padding",
        params: &[],
        repeats: false,
        doc: "key padding: j < length[b], or a keep vector [B|1, L_k]",
        build: None,
    },
    MaskTerm {
        name: "query-padding",
        params: &[],
        repeats: false,
        doc: "query padding: i < length[b]",
        build: None,
    },
    MaskTerm {
        name: "documents",
        params: &[],
        repeats: false,
        doc: "packed documents: a query sees the keys of its own document",
        build: None,
    },
    MaskTerm {
        name: "dense",
        params: &[],
        repeats: false,
        doc: "a boolean array [B|1, H|1, L_q, L_k], true = may attend",
        build: None,
    },
    MaskTerm {
        name: "fn",
        params: &[],
        repeats: false,
        doc: "a function of (b, h, i, j)",
        build: None,
    },
    MaskTerm {
        name: "per-head",
        params: &[],
        repeats: false,
        doc: "a different mask for each query head",
        build: None,
    },
];

fn chunk_size(a: &[usize]) -> std::result::Result<usize, String> {
    match a {
        [c] if *c > 0 => Ok(*c),
        [_] => Err("the chunk size must be at least 1".into()),
        _ => Err("takes one number, the chunk size".into()),
    }
}

/// The structured terms as the grammar writes them, for messages and help texts:
/// `full, causal, …, window(LEFT,RIGHT), …`.
pub fn structured_terms() -> String {
    list(MASK_TERMS.iter().filter(|t| !t.is_data()))
}

/// The data terms' names, for messages and help texts: `key-padding, …, per-head`.
pub fn data_terms() -> String {
    list(MASK_TERMS.iter().filter(|t| t.is_data()))
}

fn list<'a>(terms: impl Iterator<Item = &'a MaskTerm>) -> String {
    terms.map(MaskTerm::usage).collect::<Vec<_>>().join(", ")
}

impl Mask {
    /// The structured term `name` with its numbers: `Mask::term("window", &[3, 0])` is
    /// `window(3,0)`. A data term, an unknown name or numbers that do not fit are a
    /// [`AttnError::MaskSyntax`] error, as the same text would be.
    pub fn term(name: &str, args: &[usize]) -> Result<Mask> {
        let text = || {
            let nums: Vec<String> = args.iter().map(usize::to_string).collect();
            format!("{name}({})", nums.join(","))
        };
        let message = match MaskTerm::find(name) {
            None => format!(
                "unknown mask term `{name}`; expected {}, or a data term",
                structured_terms()
            ),
            Some(t) => match t.build {
                None => format!("`{name}` is a data term: its data must come from the caller"),
                Some(_) if t.params.is_empty() && !args.is_empty() => {
                    format!("`{}`: `{name}` takes no numbers", text())
                }
                Some(build) => match build(args) {
                    Ok(m) => return Ok(m),
                    Err(e) => format!("`{}`: {e}", text()),
                },
            },
        };
        Err(AttnError::MaskSyntax { at: 0, message })
    }
}
