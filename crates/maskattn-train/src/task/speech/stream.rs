//! Streaming inference: the [`Speech`] model run chunk by chunk as frames arrive, each
//! layer keeping the keys and values of the last `left` chunks (all of them with
//! `left = None`). A chunk's queries attend to every cached key and to their own chunk —
//! exactly the keys `chunked(C, left)` allows them in the full utterance — so the outputs
//! are the full-utterance forward's under the mask (`tests/speech_stream.rs` holds them to
//! the accuracy rule). Positions are absolute; the stream counts them from its first frame.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use maskattn::Mask;
use maskattn_candle::{attention, AttnOptions};

use super::frontend::N_MELS;
use super::{Speech, SpeechLayers};
use crate::task::encoder::Encoder;
use crate::task::Task;

/// A stream in progress over one trained model.
pub struct Stream<'a> {
    task: &'a Speech,
    layers: &'a SpeechLayers,
    encoder: &'a Encoder,
    /// Per layer: keys and values `[1, heads, n, d_head]` of the frames still visible.
    cache: Vec<Option<(Tensor, Tensor)>>,
    /// The position of the first frame.
    start: usize,
    /// Frames consumed so far.
    pos: usize,
    /// A chunk shorter than `C` came: the stream is over.
    ended: bool,
}

impl<'a> Stream<'a> {
    /// A stream whose first frame has position `start` (0 for a recording's start).
    pub fn new(
        task: &'a Speech,
        layers: &'a SpeechLayers,
        encoder: &'a Encoder,
        start: usize,
    ) -> Self {
        Stream {
            task,
            layers,
            encoder,
            cache: vec![None; encoder.trunk().layers],
            start,
            pos: 0,
            ended: false,
        }
    }

    /// Frames consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Frames of history the first layer holds now.
    pub fn cached(&self) -> usize {
        self.cache[0]
            .as_ref()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// The next chunk: `frames [c, N_MELS]` flat, normalised ([`super::normalise`]), with
    /// `c` = the chunk size, or fewer for the last chunk. Returns its logits `[c, classes]`.
    pub fn push(&mut self, frames: &[f32]) -> Result<Tensor> {
        let s = self.task.settings();
        let c = frames.len() / N_MELS;
        if c == 0 || c * N_MELS != frames.len() || c > s.chunk {
            bail!(
                "stream: a chunk is 1 to {} frames of {N_MELS} values, not {} values",
                s.chunk,
                frames.len()
            );
        }
        if self.ended {
            bail!("stream: a chunk after the last (shorter) one");
        }
        let keep = s.left.map(|k| k * s.chunk);
        let feats = Tensor::from_slice(frames, (1, c, N_MELS), &Device::Cpu)?;
        let mut x = self
            .task
            .embed(self.layers, &feats, &[(self.start + self.pos) as u32])?;
        let encoder = self.encoder;
        for (i, slot) in self.cache.iter_mut().enumerate() {
            x = encoder.block(i, &x, |q, k, v| {
                let (k, v) = match slot.take() {
                    Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
                    None => (k, v),
                };
                let out = attention(&q, &k, &v, &Mask::full(), AttnOptions::default())?.out;
                // What the next chunk may see: the last `left` chunks, this one included.
                let n = k.dim(2)?;
                let kept = keep.map_or(n, |m| m.min(n));
                if kept > 0 {
                    *slot = Some((
                        k.narrow(2, n - kept, kept)?.contiguous()?,
                        v.narrow(2, n - kept, kept)?.contiguous()?,
                    ));
                }
                Ok(out)
            })?;
        }
        let logits = self
            .task
            .logits(self.layers, &self.encoder.final_norm(&x)?)?;
        self.pos += c;
        self.ended = c < s.chunk;
        Ok(logits.squeeze(0)?)
    }
}
