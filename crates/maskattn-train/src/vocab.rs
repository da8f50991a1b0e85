//! Tokenizers: a byte-level vocabulary (256 bytes and four specials) that needs no file, or
//! a Hugging Face `tokenizer.json` (the `tokenizers` crate).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How a checkpoint remembers its tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VocabSpec {
    Bytes,
    /// The `tokenizer.json` is copied into the checkpoint under this file name.
    Hf {
        file: String,
    },
}

pub enum Vocab {
    Bytes,
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        pad: u32,
        mask: u32,
        sep: u32,
    },
}

const BYTE_PAD: u32 = 256;
const BYTE_MASK: u32 = 257;
const BYTE_SEP: u32 = 258;
const BYTE_VOCAB: usize = 259;

impl Vocab {
    pub fn load_hf(path: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
        let id = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
        let pad = id(&["[PAD]", "<pad>", "<|pad|>"]);
        let mask = id(&["[MASK]", "<mask>"]);
        let sep = id(&["[SEP]", "</s>", "<|endoftext|>", "<eos>"]);
        let (Some(pad), Some(mask), Some(sep)) = (pad.or(sep), mask, sep) else {
            bail!(
                "{}: the tokenizer needs a mask token ([MASK] or <mask>) and a separator ([SEP], </s> or <|endoftext|>)",
                path.display()
            );
        };
        Ok(Vocab::Hf {
            tok: Box::new(tok),
            pad,
            mask,
            sep,
        })
    }

    pub fn size(&self) -> usize {
        match self {
            Vocab::Bytes => BYTE_VOCAB,
            Vocab::Hf { tok, .. } => tok.get_vocab_size(true),
        }
    }

    pub fn pad(&self) -> u32 {
        match self {
            Vocab::Bytes => BYTE_PAD,
            Vocab::Hf { pad, .. } => *pad,
        }
    }

    pub fn mask(&self) -> u32 {
        match self {
            Vocab::Bytes => BYTE_MASK,
            Vocab::Hf { mask, .. } => *mask,
        }
    }

    /// Ends every document.
    pub fn sep(&self) -> u32 {
        match self {
            Vocab::Bytes => BYTE_SEP,
            Vocab::Hf { sep, .. } => *sep,
        }
    }

    pub fn is_special(&self, id: u32) -> bool {
        id == self.pad() || id == self.mask() || id == self.sep()
    }

    /// Token ids of `text`; the literal `[MASK]` becomes the mask token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Vocab::Bytes => {
                let mut out = Vec::new();
                for (i, part) in text.split("[MASK]").enumerate() {
                    if i > 0 {
                        out.push(BYTE_MASK);
                    }
                    out.extend(part.bytes().map(u32::from));
                }
                Ok(out)
            }
            Vocab::Hf { tok, mask, .. } => {
                // `[MASK]` is the mask token whatever the tokenizer's own rules make of it.
                let mut out = Vec::new();
                for (i, part) in text.split("[MASK]").enumerate() {
                    if i > 0 {
                        out.push(*mask);
                    }
                    let enc = tok
                        .encode(part, false)
                        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                    out.extend_from_slice(enc.get_ids());
                }
                Ok(out)
            }
        }
    }

    /// Readable form of one token (for tables and picture labels).
    pub fn token(&self, id: u32) -> String {
        match self {
            Vocab::Bytes => match id {
                BYTE_PAD => "[PAD]".into(),
                BYTE_MASK => "[MASK]".into(),
                BYTE_SEP => "[SEP]".into(),
                b if b < 256 => {
                    let c = b as u8 as char;
                    if c.is_ascii_graphic() {
                        c.to_string()
                    } else if c == ' ' {
                        "␣".into()
                    } else {
                        format!("\\x{b:02x}")
                    }
                }
                other => format!("<{other}>"),
            },
            Vocab::Hf { tok, .. } => tok.id_to_token(id).unwrap_or_else(|| format!("<{id}>")),
        }
    }

    /// Text of a sequence of tokens (bytes as UTF-8, lossy).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Vocab::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Vocab::Hf { tok, .. } => tok.decode(ids, true).unwrap_or_default(),
        }
    }

    /// Opens the vocabulary a checkpoint names.
    pub fn from_spec(spec: &VocabSpec, dir: &Path) -> Result<Self> {
        match spec {
            VocabSpec::Bytes => Ok(Vocab::Bytes),
            VocabSpec::Hf { file } => Self::load_hf(&dir.join(file))
                .with_context(|| format!("checkpoint {}", dir.display())),
        }
    }
}
