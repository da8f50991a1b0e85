//! The speech front end: 16 kHz samples → log-mel frames, as ASR front ends compute them
//! (Kaldi's and torchaudio's `fbank` in outline): frames of 25 ms every 10 ms, a periodic
//! Hann window, the power spectrum of a 512-point FFT (`rustfft`), 40 triangular mel filters
//! from 20 Hz to 8 kHz and the natural log.
//!
//! The mel scale is HTK's, `mel(f) = 2595 · log10(1 + f / 700)` (Young et al., *The HTK
//! Book*, section 5.4; librosa's `htk=True`), with filters of unit peak (no Slaney area
//! normalisation): filter `m` rises from the centre of `m − 1` to its own and falls to the
//! centre of `m + 1`, the centres equally spaced in mel.
//!
//! Frame `t` reads samples `[t · HOP, t · HOP + WIN)` only, so a stream computes its frames
//! as its samples arrive: the front end adds 15 ms of look-ahead to the encoder's chunk.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

/// Samples per second the front end takes.
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples per frame (25 ms).
pub const WIN: usize = 400;
/// Samples between frame starts (10 ms).
pub const HOP: usize = 160;
/// FFT size (the frame zero-padded).
pub const N_FFT: usize = 512;
/// Mel bands per frame.
pub const N_MELS: usize = 40;
/// Power below this is taken as this before the log (silence stays finite).
const FLOOR: f32 = 1e-10;

/// HTK's mel scale.
pub fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

pub fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// Frames in `samples` samples (only whole frames).
pub fn frames_in(samples: usize) -> usize {
    if samples < WIN {
        0
    } else {
        1 + (samples - WIN) / HOP
    }
}

/// Samples needed for `frames` frames.
pub fn samples_for(frames: usize) -> usize {
    if frames == 0 {
        0
    } else {
        (frames - 1) * HOP + WIN
    }
}

/// The window, the FFT plan and the filterbank, made once.
pub struct FrontEnd {
    window: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
    /// `[N_MELS, N_FFT / 2 + 1]`.
    filters: Vec<f32>,
}

impl Default for FrontEnd {
    fn default() -> Self {
        Self::new()
    }
}

impl FrontEnd {
    pub fn new() -> Self {
        // Periodic Hann (`torch.hann_window`'s default): the frames overlap-add evenly.
        let window = (0..WIN)
            .map(|n| (0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / WIN as f64).cos()) as f32)
            .collect();
        FrontEnd {
            window,
            fft: FftPlanner::new().plan_fft_forward(N_FFT),
            filters: mel_filters(N_MELS, N_FFT, SAMPLE_RATE as f64, 20.0, 8000.0),
        }
    }

    /// The filterbank `[N_MELS, N_FFT / 2 + 1]`.
    pub fn filters(&self) -> &[f32] {
        &self.filters
    }

    /// `|FFT(window · frame)|²` for bins `0..=N_FFT / 2`; `frame` holds [`WIN`] samples.
    pub fn power_spectrum(&self, frame: &[f32]) -> Vec<f32> {
        assert_eq!(frame.len(), WIN, "a frame is {WIN} samples");
        let mut buf: Vec<Complex<f32>> = frame
            .iter()
            .zip(&self.window)
            .map(|(x, w)| Complex::new(x * w, 0.0))
            .chain(std::iter::repeat(Complex::new(0.0, 0.0)))
            .take(N_FFT)
            .collect();
        self.fft.process(&mut buf);
        buf[..=N_FFT / 2].iter().map(|c| c.norm_sqr()).collect()
    }

    /// The log-mel energies of one frame of [`WIN`] samples.
    pub fn frame(&self, frame: &[f32]) -> [f32; N_MELS] {
        let p = self.power_spectrum(frame);
        let bins = N_FFT / 2 + 1;
        let mut out = [0f32; N_MELS];
        for (m, o) in out.iter_mut().enumerate() {
            let e: f32 = self.filters[m * bins..(m + 1) * bins]
                .iter()
                .zip(&p)
                .map(|(w, x)| w * x)
                .sum();
            *o = e.max(FLOOR).ln();
        }
        out
    }

    /// Frames `from..to` of `samples` (which must hold them), `[to − from, N_MELS]` flat.
    pub fn frames(&self, samples: &[f32], from: usize, to: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity((to - from) * N_MELS);
        for t in from..to {
            out.extend_from_slice(&self.frame(&samples[t * HOP..t * HOP + WIN]));
        }
        out
    }

    /// Every whole frame of `samples`, `[frames_in(len), N_MELS]` flat.
    pub fn log_mel(&self, samples: &[f32]) -> Vec<f32> {
        self.frames(samples, 0, frames_in(samples.len()))
    }
}

/// Triangular filters of unit peak, `n_mels` of them with centres equally spaced in HTK mel
/// between `fmin` and `fmax`, over the `n_fft / 2 + 1` bins of an FFT at `rate` Hz:
/// `[n_mels, n_fft / 2 + 1]` flat.
pub fn mel_filters(n_mels: usize, n_fft: usize, rate: f64, fmin: f64, fmax: f64) -> Vec<f32> {
    let bins = n_fft / 2 + 1;
    let (lo, hi) = (hz_to_mel(fmin), hz_to_mel(fmax));
    // n_mels + 2 edges: filter m spans edges m, m + 1 (its centre), m + 2.
    let edges: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut w = vec![0f32; n_mels * bins];
    for m in 0..n_mels {
        let (l, c, r) = (edges[m], edges[m + 1], edges[m + 2]);
        for k in 0..bins {
            let f = k as f64 * rate / n_fft as f64;
            let up = (f - l) / (c - l);
            let down = (r - f) / (r - c);
            w[m * bins + k] = up.min(down).max(0.0) as f32;
        }
    }
    w
}
