//! Utterances synthesised from a seed, with the phoneme of every sample: a source-filter
//! synthesiser in the manner of Klatt's (1980). Voiced phonemes are a glottal pulse train
//! at a changing pitch — its harmonics — shaped by a cascade of formant resonators (F1,
//! F2, F3); fricatives are white noise through one broad resonator (or none, for /f/);
//! silence is the background noise alone, which runs under everything.
//!
//! A *speaker* (one per utterance) scales every formant (vocal tract length, 0.85–1.2),
//! has a base pitch of 85–250 Hz that drifts and swings over the utterance, a speaking
//! rate (0.7–1.4) dividing every duration, a loudness and a noise floor. Each phoneme's
//! formants are jittered by a few percent; its length is drawn from its class's range.

use crate::rng::Rng;

use super::frontend::{samples_for, HOP, SAMPLE_RATE, WIN};

/// How a phoneme class is made.
#[derive(Clone, Copy)]
enum Kind {
    Silence,
    /// Formants (Hz) and bandwidths (Hz), and the RMS level relative to a vowel's.
    Voiced {
        formants: [(f64, f64); 3],
        level: f64,
    },
    /// Noise through a resonator at (centre, bandwidth) Hz, or white (`None`).
    Noise {
        band: Option<(f64, f64)>,
        level: f64,
    },
}

struct Class {
    name: &'static str,
    kind: Kind,
    /// Duration range at rate 1, ms.
    ms: (f64, f64),
}

/// The phoneme classes; a frame's label is an index into this.
const CLASSES: [Class; 9] = [
    Class {
        name: "sil",
        kind: Kind::Silence,
        ms: (60.0, 250.0),
    },
    // Peterson & Barney's (1952) average male formants, F3 as listed there.
    Class {
        name: "a",
        kind: Kind::Voiced {
            formants: [(730.0, 90.0), (1090.0, 110.0), (2440.0, 170.0)],
            level: 1.0,
        },
        ms: (70.0, 180.0),
    },
    Class {
        name: "i",
        kind: Kind::Voiced {
            formants: [(270.0, 60.0), (2290.0, 110.0), (3010.0, 170.0)],
            level: 0.9,
        },
        ms: (70.0, 180.0),
    },
    Class {
        name: "u",
        kind: Kind::Voiced {
            formants: [(300.0, 60.0), (870.0, 90.0), (2240.0, 170.0)],
            level: 0.9,
        },
        ms: (70.0, 180.0),
    },
    Class {
        name: "e",
        kind: Kind::Voiced {
            formants: [(530.0, 80.0), (1840.0, 110.0), (2480.0, 170.0)],
            level: 1.0,
        },
        ms: (70.0, 180.0),
    },
    // A nasal murmur: a low first resonance, weak upper ones (the nose damps them).
    Class {
        name: "m",
        kind: Kind::Voiced {
            formants: [(250.0, 80.0), (1100.0, 300.0), (2300.0, 400.0)],
            level: 0.35,
        },
        ms: (50.0, 110.0),
    },
    Class {
        name: "s",
        kind: Kind::Noise {
            band: Some((5500.0, 2000.0)),
            level: 0.35,
        },
        ms: (70.0, 160.0),
    },
    Class {
        name: "sh",
        kind: Kind::Noise {
            band: Some((2800.0, 1000.0)),
            level: 0.4,
        },
        ms: (70.0, 160.0),
    },
    Class {
        name: "f",
        kind: Kind::Noise {
            band: None,
            level: 0.12,
        },
        ms: (60.0, 140.0),
    },
];

/// The number of phoneme classes.
pub const N_CLASSES: usize = CLASSES.len();

/// The name of class `c` (`sil`, `a`, …).
pub fn class_name(c: usize) -> &'static str {
    CLASSES[c].name
}

/// A synthesised utterance: its samples at [`SAMPLE_RATE`] and the class of each frame.
pub struct Utterance {
    pub samples: Vec<f32>,
    /// The class at each frame's centre, one per frame of the front end.
    pub labels: Vec<u32>,
}

/// Klatt's digital resonator: `y[n] = A x[n] + B y[n−1] + C y[n−2]`, unit gain at 0 Hz.
struct Resonator {
    a: f64,
    b: f64,
    c: f64,
    y1: f64,
    y2: f64,
}

impl Resonator {
    fn new(freq: f64, bw: f64) -> Self {
        let t = 1.0 / SAMPLE_RATE as f64;
        let c = -(-std::f64::consts::TAU * bw * t).exp();
        let b =
            2.0 * (-std::f64::consts::PI * bw * t).exp() * (std::f64::consts::TAU * freq * t).cos();
        Resonator {
            a: 1.0 - b - c,
            b,
            c,
            y1: 0.0,
            y2: 0.0,
        }
    }

    fn step(&mut self, x: f64) -> f64 {
        let y = self.a * x + self.b * self.y1 + self.c * self.y2;
        self.y2 = self.y1;
        self.y1 = y;
        y
    }
}

/// An utterance of exactly `frames` frames drawn from `rng`: silence, then phonemes (never
/// the same class twice running), ending wherever the frames end.
pub fn utterance(rng: &mut Rng, frames: usize) -> Utterance {
    let fs = SAMPLE_RATE as f64;
    let n = samples_for(frames);
    let tract = 0.85 + 0.35 * rng.unit();
    let f0 = 85.0 + 165.0 * rng.unit();
    let rate = 0.7 + 0.7 * rng.unit();
    let loud = 0.05 * 4f64.powf(rng.unit());
    let floor = loud * 0.003 * 4f64.powf(rng.unit());
    let (swing, swing_hz, swing_phase) = (0.15 * rng.unit(), 0.5 + 2.0 * rng.unit(), rng.unit());
    let drift = 0.3 * (rng.unit() - 0.5);
    let dur = n as f64 / fs;

    // The pitch contour and the glottal pulses (one sample each) over the whole utterance.
    let mut pulses = vec![0f64; n];
    let mut phase = rng.unit();
    for (i, p) in pulses.iter_mut().enumerate() {
        let t = i as f64 / fs;
        let f = f0
            * (1.0 + drift * t / dur.max(1e-3))
            * (1.0 + swing * (std::f64::consts::TAU * (swing_hz * t + swing_phase)).sin());
        phase += f / fs;
        if phase >= 1.0 {
            phase -= 1.0;
            *p = 1.0;
        }
    }

    // The phoneme of every sample.
    let mut class_at = vec![0u32; n];
    let mut signal = vec![0f64; n];
    let (mut at, mut prev) = (0usize, 0usize);
    while at < n {
        let c = if at == 0 {
            0
        } else {
            // Any class but the last; a pause (silence) less often than a phoneme.
            loop {
                let c = if rng.unit() < 0.06 {
                    0
                } else {
                    1 + rng.below(N_CLASSES - 1)
                };
                if c != prev {
                    break c;
                }
            }
        };
        let (lo, hi) = CLASSES[c].ms;
        let len = (((lo + (hi - lo) * rng.unit()) / rate) * fs / 1e3) as usize;
        let end = (at + len.max(HOP)).min(n);
        class_at[at..end].fill(c as u32);
        let jitter = |rng: &mut Rng| 1.0 + 0.05 * rng.normal().clamp(-2.0, 2.0);
        // Each segment starts its filters a little early so they have settled.
        let lead = at.min(320);
        let seg: Vec<f64> = match CLASSES[c].kind {
            Kind::Silence => vec![0.0; end - at + lead],
            Kind::Voiced { formants, level } => {
                let mut rs: Vec<Resonator> = formants
                    .iter()
                    .map(|&(f, bw)| Resonator::new(f * tract * jitter(rng), bw))
                    .collect();
                // A glottal low-pass (Klatt's RGP at 0 Hz): the source falls with frequency.
                let mut glottal = Resonator::new(0.0, 100.0);
                // The lips' radiation, a first difference (+6 dB per octave; no DC).
                let mut last = 0.0;
                let y: Vec<f64> = pulses[at - lead..end]
                    .iter()
                    .map(|&x| {
                        let v = rs.iter_mut().fold(glottal.step(x), |v, r| r.step(v));
                        let d = v - last;
                        last = v;
                        d
                    })
                    .collect();
                scaled(y, lead, level)
            }
            Kind::Noise { band, level } => {
                let mut r = band.map(|(f, bw)| Resonator::new(f * jitter(rng), bw));
                let mut last = 0.0;
                let y: Vec<f64> = (at - lead..end)
                    .map(|_| {
                        let x = rng.normal();
                        // The resonator passes 0 Hz at unit gain: difference the noise
                        // first, so the low frequencies fall away.
                        let d = x - last;
                        last = x;
                        match &mut r {
                            Some(r) => r.step(d),
                            None => x,
                        }
                    })
                    .collect();
                scaled(y, lead, level)
            }
        };
        // 5 ms ramps in and out: no clicks at the joins.
        let ramp = 80.min((end - at) / 2).max(1);
        for (k, v) in seg[lead..].iter().enumerate() {
            let g = ((k + 1) as f64 / ramp as f64)
                .min((end - at - k) as f64 / ramp as f64)
                .min(1.0);
            signal[at + k] += loud * g * v;
        }
        prev = c;
        at = end;
    }
    let samples = signal
        .iter()
        .map(|&s| (s + floor * rng.normal()) as f32)
        .collect();
    let labels = (0..frames).map(|t| class_at[t * HOP + WIN / 2]).collect();
    Utterance { samples, labels }
}

/// `y[lead..]` scaled to an RMS of `level`.
fn scaled(y: Vec<f64>, lead: usize, level: f64) -> Vec<f64> {
    let body = &y[lead..];
    let rms = (body.iter().map(|v| v * v).sum::<f64>() / body.len().max(1) as f64).sqrt();
    let g = if rms > 0.0 { level / rms } else { 0.0 };
    y.into_iter().map(|v| v * g).collect()
}
