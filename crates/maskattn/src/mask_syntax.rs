//! The one written form of a mask: `causal & !(window(3,3) | prefix(8))`.
//!
//! ```text
//! expr  := and ('|' and)*            `|` binds loosest,
//! and   := not ('&' not)*            then `&`,
//! not   := '!'* atom                 `!` tightest
//! atom  := '(' expr ')' | term
//! term  := full | causal | causal-top-left | window(LEFT,RIGHT) | chunks(C)
//!        | block-causal(C) | neighbourhood(HEIGHT,WIDTH,RADIUS)
//!        | natten(HEIGHT,WIDTH,KERNEL[,DILATION]) | swin(HEIGHT,WIDTH,WINDOW,SHIFT)
//!        | chunked(C[,LEFT]) | prefix(P[,P…])
//!        | NAME                      a data term, bound by the caller
//! ```
//!
//! The terms, their numbers and what they mean are listed once, in
//! [`crate::MASK_TERMS`]; this file reads names and numbers and asks that list.
//!
//! Numbers are decimal `usize`s; spaces are allowed between tokens. A data term (a bare
//! name such as `key-padding`, `documents`, `dense`) stands for a mask whose data the text
//! cannot carry; [`MaskExpr::bind`] asks the caller for it. `Display` of a [`Mask`] writes
//! this grammar, so `text.parse::<Mask>()` of a printed structured mask gives it back.
//!
//! The parser does not recurse: chains are read in a loop, runs of `!` are counted, and
//! open parentheses live on a stack of their own, at most [`Mask::MAX_DEPTH`] deep (which
//! bounds the recursion of binding and evaluating what was read).

use std::fmt;
use std::str::FromStr;

use crate::error::{AttnError, Result};
use crate::mask::{CausalAlign, Mask};
use crate::mask_terms::{structured_terms, MaskTerm};

/// A parsed mask expression whose data terms are not yet bound.
#[derive(Clone, Debug)]
pub struct MaskExpr {
    root: Node,
}

#[derive(Clone, Debug)]
enum Node {
    Term(Mask),
    Data { name: String, at: usize },
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

impl MaskExpr {
    /// Parses `expr`; errors name the byte where reading stopped.
    pub fn parse(expr: &str) -> Result<Self> {
        let mut p = Parser {
            s: expr.as_bytes(),
            text: expr,
            pos: 0,
        };
        Ok(MaskExpr { root: p.expr()? })
    }

    /// The data terms the expression names (with repeats), each with its byte position.
    pub fn data_terms(&self) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(n) = stack.pop() {
            match n {
                Node::Data { name, at } => out.push((name.as_str(), *at)),
                Node::And(v) | Node::Or(v) => stack.extend(v.iter().rev()),
                Node::Not(x) => stack.push(x),
                Node::Term(_) => {}
            }
        }
        out
    }

    /// The mask, with each data term replaced by what `data(name)` returns.
    pub fn bind<E>(
        &self,
        mut data: impl FnMut(&str) -> std::result::Result<Mask, E>,
    ) -> std::result::Result<Mask, E> {
        self.bind_at(&mut |name, _| data(name))
    }

    fn bind_at<E>(
        &self,
        data: &mut dyn FnMut(&str, usize) -> std::result::Result<Mask, E>,
    ) -> std::result::Result<Mask, E> {
        // Recursion per level of parentheses only, which the parser bounded.
        fn go<E>(
            n: &Node,
            data: &mut dyn FnMut(&str, usize) -> std::result::Result<Mask, E>,
        ) -> std::result::Result<Mask, E> {
            Ok(match n {
                Node::Term(m) => m.clone(),
                Node::Data { name, at } => data(name, *at)?,
                Node::And(v) => fold(v, data, |a, b| a & b)?,
                Node::Or(v) => fold(v, data, |a, b| a | b)?,
                Node::Not(x) => !go(x, data)?,
            })
        }
        fn fold<E>(
            v: &[Node],
            data: &mut dyn FnMut(&str, usize) -> std::result::Result<Mask, E>,
            op: fn(Mask, Mask) -> Mask,
        ) -> std::result::Result<Mask, E> {
            let mut acc = go(&v[0], data)?;
            for n in &v[1..] {
                acc = op(acc, go(n, data)?);
            }
            Ok(acc)
        }
        go(&self.root, data)
    }
}

impl FromStr for MaskExpr {
    type Err = AttnError;
    fn from_str(s: &str) -> Result<Self> {
        MaskExpr::parse(s)
    }
}

impl Mask {
    /// Parses `expr`, asking `data(name)` for each data term (`None`: no such data).
    pub fn parse_with(expr: &str, mut data: impl FnMut(&str) -> Option<Mask>) -> Result<Mask> {
        MaskExpr::parse(expr)?.bind_at(&mut |name, at| data(name).ok_or_else(|| unbound(name, at)))
    }
}

/// The error for a data term that nobody bound.
fn unbound(name: &str, at: usize) -> AttnError {
    let message = if MaskTerm::find(name).is_some_and(MaskTerm::is_data) {
        format!("`{name}` is a data term: its data must come from the caller (Mask::parse_with)")
    } else {
        format!(
            "unknown mask term `{name}`; expected {}, or a data term",
            structured_terms()
        )
    };
    AttnError::MaskSyntax { at, message }
}

/// Structured masks only: a data term is an error.
impl FromStr for Mask {
    type Err = AttnError;
    fn from_str(s: &str) -> Result<Mask> {
        Mask::parse_with(s, |_| None)
    }
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: String) -> AttnError {
        AttnError::MaskSyntax {
            at: self.pos,
            message,
        }
    }

    /// The character at the reading position, for messages (the text is UTF-8).
    fn rest_char(&self) -> char {
        self.text[self.pos..].chars().next().unwrap_or(' ')
    }

    fn skip_space(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_space();
        let hit = self.s.get(self.pos) == Some(&c);
        self.pos += hit as usize;
        hit
    }

    /// The whole expression, read in one loop with a stack of open parentheses: a long
    /// chain costs no stack, and nesting is bounded by [`Mask::MAX_DEPTH`].
    fn expr(&mut self) -> Result<Node> {
        let mut open: Vec<Group> = vec![Group::new(0, false)];
        loop {
            // An operand: `!`s, then `(` (a new group) or a term.
            let mut odd = false;
            while self.eat(b'!') {
                odd = !odd;
            }
            self.skip_space();
            if self.s.get(self.pos) == Some(&b'(') {
                if open.len() > Mask::MAX_DEPTH {
                    return Err(self.error(format!(
                        "parentheses nested more than {} deep",
                        Mask::MAX_DEPTH
                    )));
                }
                open.push(Group::new(self.pos, odd));
                self.pos += 1;
                continue;
            }
            let mut node = negate(odd, self.term()?);
            // After an operand: close groups, then an operator or the end.
            loop {
                let top = open.last_mut().expect("the outermost group stays open");
                top.and.push(node);
                self.skip_space();
                match self.s.get(self.pos) {
                    Some(b'&') => {
                        self.pos += 1;
                        break;
                    }
                    Some(b'|') => {
                        self.pos += 1;
                        let and = std::mem::take(&mut top.and);
                        top.or.push(join(and, Node::And));
                        break;
                    }
                    Some(b')') if open.len() > 1 => {
                        self.pos += 1;
                        let g = open.pop().expect("checked");
                        node = negate(g.negated, g.finish());
                    }
                    None if open.len() == 1 => {
                        return Ok(open.pop().expect("checked").finish());
                    }
                    None => {
                        let at = open.last().map_or(0, |g| g.at);
                        return Err(self.error(format!("the `(` at byte {at} is never closed")));
                    }
                    Some(_) => {
                        let want = if open.len() > 1 { "`)`" } else { "the end" };
                        return Err(self.error(format!(
                            "unexpected `{}`; expected `&`, `|` or {want}",
                            self.rest_char()
                        )));
                    }
                }
            }
        }
    }

    /// A term: a name, with numbers in parentheses for the structured terms that take them.
    fn term(&mut self) -> Result<Node> {
        let start = self.pos;
        match self.s.get(self.pos) {
            Some(c) if c.is_ascii_alphabetic() => {}
            None => return Err(self.error("expected a mask term, found the end".into())),
            Some(_) => {
                return Err(self.error(format!(
                    "unexpected `{}`; expected a mask term, `!` or `(`",
                    self.rest_char()
                )))
            }
        }
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            self.pos += 1;
        }
        let name = &self.text[start..self.pos];
        let mut args = None;
        let before_args = self.pos;
        self.skip_space();
        if self.s.get(self.pos) == Some(&b'(') {
            let Some(close) = self.text[self.pos..].find(')').map(|x| self.pos + x) else {
                return Err(self.error(format!(
                    "`{}`: the `(` is never closed",
                    &self.text[start..]
                )));
            };
            args = Some(&self.text[self.pos + 1..close]);
            self.pos = close + 1;
        } else {
            self.pos = before_args;
        }
        let t = &self.text[start..self.pos];
        match term(name, args, t) {
            Ok(Some(m)) => Ok(Node::Term(m)),
            Ok(None) => Ok(Node::Data {
                name: name.to_string(),
                at: start,
            }),
            Err(message) => Err(AttnError::MaskSyntax { at: start, message }),
        }
    }
}

/// An open parenthesis (or the whole expression): the `|` terms read so far, the `&` terms
/// of the one being read, and whether a `!` stood before the `(`.
struct Group {
    at: usize,
    negated: bool,
    or: Vec<Node>,
    and: Vec<Node>,
}

impl Group {
    fn new(at: usize, negated: bool) -> Self {
        Group {
            at,
            negated,
            or: Vec::new(),
            and: Vec::new(),
        }
    }

    fn finish(mut self) -> Node {
        self.or.push(join(self.and, Node::And));
        join(self.or, Node::Or)
    }
}

/// One node, or the operator over several.
fn join(mut v: Vec<Node>, op: fn(Vec<Node>) -> Node) -> Node {
    if v.len() == 1 {
        v.pop().expect("one")
    } else {
        op(v)
    }
}

/// `!node` when `odd`; `!!x` is `x`.
fn negate(odd: bool, node: Node) -> Node {
    match (odd, node) {
        (false, n) => n,
        (true, Node::Not(n)) => *n,
        (true, n) => Node::Not(Box::new(n)),
    }
}

/// One term: `Some(mask)` for a structured term, `None` for a data term (or a name that is
/// no term, which binding reports). `t` is the term's text, for messages.
fn term(name: &str, args: Option<&str>, t: &str) -> std::result::Result<Option<Mask>, String> {
    let numbers = |inner: &str| -> std::result::Result<Vec<usize>, String> {
        inner
            .split(',')
            .map(|x| {
                let x = x.trim();
                x.parse::<usize>().map_err(|_| {
                    if !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit()) {
                        format!(
                            "`{t}`: `{x}` is larger than the largest size, {}",
                            usize::MAX
                        )
                    } else {
                        format!("`{t}`: `{x}` is not a non-negative integer")
                    }
                })
            })
            .collect()
    };
    let build = match MaskTerm::find(name) {
        Some(MaskTerm {
            build: Some(build),
            params,
            ..
        }) => match (args, params.is_empty()) {
            (None, true) => build,
            (Some(_), true) => return Err(format!("`{t}`: `{name}` takes no numbers")),
            (None, false) => return Err(format!("`{t}`: expected {name}(...)")),
            (Some(_), false) => build,
        },
        _ if args.is_some() => {
            return Err(format!(
                "unknown mask term `{t}`; expected {}",
                structured_terms()
            ))
        }
        _ => return Ok(None),
    };
    let nums = args.map(numbers).transpose()?.unwrap_or_default();
    build(&nums).map(Some).map_err(|e| format!("`{t}`: {e}"))
}

/// How tightly a node binds: `|` loosest, then `&`, then `!` and single terms.
fn precedence(m: &Mask) -> u8 {
    match m {
        Mask::Or(_) => 1,
        Mask::And(_) => 2,
        _ => 3,
    }
}

/// Writes `m` in the grammar, without recursion: a stack of what remains to be written.
/// `with_data` adds a summary of each data term's data in brackets (for `Debug`).
fn write_mask(m: &Mask, f: &mut fmt::Formatter<'_>, with_data: bool) -> fmt::Result {
    enum Step<'a> {
        /// A mask, and the precedence below which it needs parentheses.
        Mask(&'a Mask, u8),
        Text(&'static str),
    }
    let mut stack = vec![Step::Mask(m, 0)];
    while let Some(step) = stack.pop() {
        let (m, min) = match step {
            Step::Text(t) => {
                f.write_str(t)?;
                continue;
            }
            Step::Mask(m, min) => (m, min),
        };
        let parens = precedence(m) < min;
        if parens {
            f.write_str("(")?;
            stack.push(Step::Text(")"));
        }
        match m {
            Mask::And(t) | Mask::Or(t) => {
                let (sep, p) = if let Mask::And(_) = m {
                    (" & ", 2)
                } else {
                    (" | ", 1)
                };
                for (n, c) in t.iter().enumerate().rev() {
                    stack.push(Step::Mask(c, p));
                    if n > 0 {
                        stack.push(Step::Text(sep));
                    }
                }
            }
            Mask::Not(inner) => {
                f.write_str("!")?;
                stack.push(Step::Mask(inner, 3));
            }
            Mask::PerHead(ms) => {
                f.write_str("per-head")?;
                if with_data {
                    f.write_str("[")?;
                    stack.push(Step::Text("]"));
                    for (n, c) in ms.iter().enumerate().rev() {
                        stack.push(Step::Mask(c, 0));
                        if n > 0 {
                            stack.push(Step::Text(", "));
                        }
                    }
                }
            }
            leaf => write_leaf(leaf, f, with_data)?,
        }
    }
    Ok(())
}

fn write_leaf(m: &Mask, f: &mut fmt::Formatter<'_>, with_data: bool) -> fmt::Result {
    match m {
        Mask::Full => f.write_str("full"),
        Mask::Causal(CausalAlign::BottomRight) => f.write_str("causal"),
        Mask::Causal(CausalAlign::TopLeft) => f.write_str("causal-top-left"),
        Mask::Window { left, right } => write!(f, "window({left},{right})"),
        Mask::Chunks {
            size,
            earlier: false,
        } => write!(f, "chunks({size})"),
        Mask::Chunks {
            size,
            earlier: true,
        } => write!(f, "block-causal({size})"),
        Mask::Neighbourhood {
            height,
            width,
            radius,
        } => write!(f, "neighbourhood({height},{width},{radius})"),
        Mask::Natten {
            height,
            width,
            kernel,
            dilation: 1,
        } => write!(f, "natten({height},{width},{kernel})"),
        Mask::Natten {
            height,
            width,
            kernel,
            dilation,
        } => write!(f, "natten({height},{width},{kernel},{dilation})"),
        Mask::Swin {
            height,
            width,
            window,
            shift,
        } => write!(f, "swin({height},{width},{window},{shift})"),
        Mask::Chunked { size, left: None } => write!(f, "chunked({size})"),
        Mask::Chunked {
            size,
            left: Some(left),
        } => write!(f, "chunked({size},{left})"),
        Mask::Prefix(p) => {
            f.write_str("prefix(")?;
            for (n, x) in p.iter().enumerate() {
                write!(f, "{}{x}", if n > 0 { "," } else { "" })?;
            }
            f.write_str(")")
        }
        Mask::KeyLengths(v) => {
            f.write_str("key-padding")?;
            if with_data {
                write!(f, "[lengths {v:?}]")?;
            }
            Ok(())
        }
        Mask::KeyKeep { rows, .. } => {
            f.write_str("key-padding")?;
            if with_data {
                write!(f, "[keep vector, {rows} rows]")?;
            }
            Ok(())
        }
        Mask::QueryLengths(v) => {
            f.write_str("query-padding")?;
            if with_data {
                write!(f, "[lengths {v:?}]")?;
            }
            Ok(())
        }
        Mask::Documents { rows, .. } => {
            f.write_str("documents")?;
            if with_data {
                write!(f, "[{rows} rows]")?;
            }
            Ok(())
        }
        Mask::Dense(d) => {
            f.write_str("dense")?;
            if with_data {
                write!(f, "{:?}", d.dims())?;
            }
            Ok(())
        }
        Mask::Func { per_batch_head, .. } => {
            f.write_str("fn")?;
            if with_data {
                f.write_str(if *per_batch_head {
                    "[b,h,i,j]"
                } else {
                    "[i,j]"
                })?;
            }
            Ok(())
        }
        Mask::And(_) | Mask::Or(_) | Mask::Not(_) | Mask::PerHead(_) => {
            unreachable!("composites are written by write_mask")
        }
    }
}

/// The grammar above: `causal & !(window(3,3) | prefix(8))`.
impl fmt::Display for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_mask(self, f, false)
    }
}

/// The same spelling as `Display`, with each data term's data summarised in brackets
/// (`key-padding[lengths [5, 7]]`).
impl fmt::Debug for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_mask(self, f, true)
    }
}
