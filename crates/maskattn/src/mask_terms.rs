//! The one list of mask terms: every name the grammar knows, the numbers it takes, a line of
//! help, and (for a structured term) how to build it.
//!
//! The parser ([`crate::MaskExpr`]), the command line's help text and the Python bindings
//! all read their vocabulary from [`MASK_TERMS`], so a new structured kind is a variant in
//! `mask.rs`, its evaluation and classification, its `Display`, and one entry here —
//! nothing outside this crate is edited by hand.

use crate::error::{AttnError, Result};
use crate::mask::Mask;
use crate::mask_grid::{natten_check, swin_check};

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
    /// How many of the last `params` may be left out (`chunked(C[,LEFT])`: 1).
    pub optional: usize,
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

    /// How the grammar writes it, numbers by name: `window(LEFT,RIGHT)`, `prefix(P[,P…])`,
    /// `chunked(C[,LEFT])`.
    pub fn usage(&self) -> String {
        if self.params.is_empty() {
            return self.name.to_string();
        }
        let more = if self.repeats {
            format!("[,{}…]", self.params[self.params.len() - 1])
        } else {
            String::new()
        };
        let (required, optional) = self.params.split_at(self.params.len() - self.optional);
        let optional: String = optional.iter().map(|p| format!("[,{p}]")).collect();
        format!("{}({}{optional}{more})", self.name, required.join(","))
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
        optional: 0,
        doc: "every query sees every key",
        build: Some(|_| Ok(Mask::full())),
    },
    MaskTerm {
        name: "causal",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "j ≤ i + (L_k − L_q): causal, bottom-right aligned (the last query sees the last key)",
        build: Some(|_| Ok(Mask::causal())),
    },
    MaskTerm {
        name: "causal-top-left",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "j ≤ i: causal, top-left aligned (PyTorch's is_causal when L_q ≠ L_k)",
        build: Some(|_| Ok(Mask::causal_top_left())),
    },
    MaskTerm {
        name: "window",
        params: &["LEFT", "RIGHT"],
        repeats: false,
        optional: 0,
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
        optional: 0,
        doc: "⌊j/C⌋ = ⌊i'/C⌋: local attention in fixed chunks of C positions",
        build: Some(|a| chunk_size(a).map(Mask::chunks)),
    },
    MaskTerm {
        name: "block-causal",
        params: &["C"],
        repeats: false,
        optional: 0,
        doc: "⌊j/C⌋ ≤ ⌊i'/C⌋: a query's whole chunk of C positions and every earlier one",
        build: Some(|a| chunk_size(a).map(Mask::block_causal)),
    },
    MaskTerm {
        name: "neighbourhood",
        params: &["HEIGHT", "WIDTH", "RADIUS"],
        repeats: false,
        optional: 0,
        doc: "positions on a HEIGHT × WIDTH grid in raster order; rows and columns at most RADIUS apart",
        build: Some(|a| match a {
            [h, w, r] if *h > 0 && *w > 0 => Ok(Mask::neighbourhood(*h, *w, *r)),
            _ => Err("neighbourhood takes a grid and a radius, \
                 neighbourhood(HEIGHT,WIDTH,RADIUS), HEIGHT and WIDTH at least 1"
                .into()),
        }),
    },
    MaskTerm {
        name: "natten",
        params: &["HEIGHT", "WIDTH", "KERNEL", "DILATION"],
        repeats: false,
        optional: 1,
        doc: "NATTEN neighbourhood attention on a HEIGHT × WIDTH grid in raster order: a \
              KERNEL × KERNEL window (odd KERNEL), its centre clamped inside the grid; keys \
              DILATION apart (default 1)",
        build: Some(|a| {
            let (h, w, k, d) = match a {
                [h, w, k] => (*h, *w, *k, 1),
                [h, w, k, d] => (*h, *w, *k, *d),
                _ => {
                    return Err("natten takes a grid and a kernel, and a dilation or not: \
                                natten(HEIGHT,WIDTH,KERNEL[,DILATION])"
                        .into())
                }
            };
            natten_check(h, w, k, d).map(|()| Mask::natten_dilated(h, w, k, d))
        }),
    },
    MaskTerm {
        name: "swin",
        params: &["HEIGHT", "WIDTH", "WINDOW", "SHIFT"],
        repeats: false,
        optional: 0,
        doc: "Swin windows on a HEIGHT × WIDTH grid in raster order: WINDOW × WINDOW windows \
              of the grid rolled by −SHIFT, wrapped-around regions kept apart (SHIFT 0: plain)",
        build: Some(|a| match a {
            [h, w, win, s] => swin_check(*h, *w, *win, *s).map(|()| Mask::swin(*h, *w, *win, *s)),
            _ => Err("swin takes a grid, a window and a shift, swin(HEIGHT,WIDTH,WINDOW,SHIFT)".into()),
        }),
    },
    MaskTerm {
        name: "chunked",
        params: &["C", "LEFT"],
        repeats: false,
        optional: 1,
        doc: "WeNet's chunk mask: ⌊i'/C⌋ − LEFT ≤ ⌊j/C⌋ ≤ ⌊i'/C⌋, a query's chunk of C \
              positions and LEFT chunks before it (no LEFT: every earlier chunk)",
        build: Some(|a| match a {
            [_] => chunk_size(a).map(|c| Mask::chunked(c, None)),
            [c, l] => chunk_size(&[*c]).map(|c| Mask::chunked(c, Some(*l))),
            _ => Err("chunked takes a chunk size and a number of left chunks or not, chunked(C[,LEFT])".into()),
        }),
    },
    MaskTerm {
        name: "prefix",
        params: &["P"],
        repeats: true,
        optional: 0,
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
        optional: 0,
        doc: "key padding: j < length[b], or a keep vector [B|1, L_k]",
        build: None,
    },
    MaskTerm {
        name: "query-padding",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "query padding: i < length[b]",
        build: None,
    },
    MaskTerm {
        name: "documents",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "packed documents: a query sees the keys of its own document",
        build: None,
    },
    MaskTerm {
        name: "dense",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "a boolean array [B|1, H|1, L_q, L_k], true = may attend",
        build: None,
    },
    MaskTerm {
        name: "fn",
        params: &[],
        repeats: false,
        optional: 0,
        doc: "a function of (b, h, i, j)",
        build: None,
    },
    MaskTerm {
        name: "per-head",
        params: &[],
        repeats: false,
        optional: 0,
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
