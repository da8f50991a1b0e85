//! The speech front end against independent computations: the power spectrum against a
//! direct DFT in f64, the mel scale against HTK's published values, the filterbank's
//! triangles, a pure tone landing in the band whose centre is nearest to it; and the
//! synthesiser's labels against the signal (silence is quiet, fricatives are high).

use maskattn_train::rng::Rng;
use maskattn_train::task::speech::frontend::{
    frames_in, hz_to_mel, mel_to_hz, samples_for, FrontEnd, HOP, N_FFT, N_MELS, SAMPLE_RATE, WIN,
};
use maskattn_train::task::speech::synth::{self, N_CLASSES};

/// `|Σ_n w_n x_n e^{−2πikn/N}|²` for bins `0..=N/2`, in f64, the Hann window written out.
fn direct_dft(x: &[f32]) -> Vec<f64> {
    let w = |n: usize| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / WIN as f64).cos();
    (0..=N_FFT / 2)
        .map(|k| {
            let (mut re, mut im) = (0f64, 0f64);
            for (n, &v) in x.iter().enumerate() {
                let a = -2.0 * std::f64::consts::PI * (k * n) as f64 / N_FFT as f64;
                re += w(n) * v as f64 * a.cos();
                im += w(n) * v as f64 * a.sin();
            }
            re * re + im * im
        })
        .collect()
}

#[test]
fn the_power_spectrum_is_the_direct_dft() {
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..WIN).map(|_| rng.normal() as f32 * 0.3).collect();
    let fe = FrontEnd::new();
    let p = fe.power_spectrum(&x);
    let golden = direct_dft(&x);
    let top = golden.iter().cloned().fold(0f64, f64::max);
    for (k, (a, b)) in p.iter().zip(&golden).enumerate() {
        // f32 FFT of 512 points: relative rounding ~1e-6 of the largest bin.
        assert!(
            (*a as f64 - b).abs() <= 1e-5 * top,
            "bin {k}: {a} against {b}"
        );
    }
}

#[test]
fn the_mel_scale_is_htks() {
    // HTK: mel(f) = 2595 log10(1 + f/700); mel(1000 Hz) ≈ 1000, mel(700 Hz) = 2595 log10 2.
    assert!((hz_to_mel(1000.0) - 999.985).abs() < 1e-2);
    assert!((hz_to_mel(700.0) - 2595.0 * 2f64.log10()).abs() < 1e-9);
    for f in [20.0, 440.0, 3000.0, 8000.0] {
        assert!((mel_to_hz(hz_to_mel(f)) - f).abs() < 1e-9);
    }
}

#[test]
fn the_filters_are_triangles_of_unit_peak_spaced_in_mel() {
    let fe = FrontEnd::new();
    let bins = N_FFT / 2 + 1;
    let f = fe.filters();
    assert_eq!(f.len(), N_MELS * bins);
    let hz = |k: usize| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64;
    let mut last_peak = 0.0;
    for m in 0..N_MELS {
        let row = &f[m * bins..(m + 1) * bins];
        assert!(row.iter().all(|&w| (0.0..=1.0).contains(&w)));
        // The band's centre, from the definition: N_MELS + 2 edges equally spaced in mel.
        let (lo, hi) = (hz_to_mel(20.0), hz_to_mel(8000.0));
        let centre = mel_to_hz(lo + (hi - lo) * (m + 1) as f64 / (N_MELS + 1) as f64);
        let peak = (0..bins)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert!(
            (hz(peak) - centre).abs() <= SAMPLE_RATE as f64 / N_FFT as f64,
            "band {m}: peak at {} Hz, centre {centre} Hz",
            hz(peak)
        );
        assert!(hz(peak) >= last_peak);
        last_peak = hz(peak);
        // Rises then falls: no second hump.
        let up = row[..=peak].windows(2).all(|w| w[0] <= w[1]);
        let down = row[peak..].windows(2).all(|w| w[0] >= w[1]);
        assert!(up && down, "band {m} is not a triangle");
    }
}

#[test]
fn a_pure_tone_lands_in_the_band_centred_nearest_it() {
    let fe = FrontEnd::new();
    let (lo, hi) = (hz_to_mel(20.0), hz_to_mel(8000.0));
    for tone in [250.0, 1000.0, 3100.0, 6000.0] {
        let x: Vec<f32> = (0..WIN)
            .map(|n| (0.5 * (2.0 * std::f64::consts::PI * tone * n as f64 / 16000.0).sin()) as f32)
            .collect();
        let mel = fe.frame(&x);
        let loudest = (0..N_MELS)
            .max_by(|&a, &b| mel[a].total_cmp(&mel[b]))
            .unwrap();
        let nearest = (0..N_MELS)
            .min_by(|&a, &b| {
                let c = |m: usize| {
                    (mel_to_hz(lo + (hi - lo) * (m + 1) as f64 / (N_MELS + 1) as f64) - tone).abs()
                };
                c(a).total_cmp(&c(b))
            })
            .unwrap();
        assert_eq!(loudest, nearest, "a tone of {tone} Hz");
    }
}

#[test]
fn frames_are_25_ms_every_10_ms() {
    assert_eq!((WIN, HOP), (400, 160));
    assert_eq!(frames_in(399), 0);
    assert_eq!(frames_in(400), 1);
    assert_eq!(frames_in(400 + 159), 1);
    assert_eq!(frames_in(400 + 160), 2);
    assert_eq!(samples_for(2), 560);
    let x = vec![0.1f32; samples_for(5)];
    let fe = FrontEnd::new();
    assert_eq!(fe.log_mel(&x).len(), 5 * N_MELS);
    // A frame depends on its own samples only: the third frame from its window alone.
    let mut rng = Rng::new(1);
    let y: Vec<f32> = (0..samples_for(5)).map(|_| rng.normal() as f32).collect();
    let all = fe.log_mel(&y);
    assert_eq!(
        &all[2 * N_MELS..3 * N_MELS],
        &fe.frame(&y[2 * HOP..2 * HOP + WIN])[..]
    );
}

#[test]
fn the_synthesiser_labels_what_it_sounds() {
    let mut rng = Rng::new(11);
    let (mut energy, mut high, mut count) =
        ([0f64; N_CLASSES], [0f64; N_CLASSES], [0usize; N_CLASSES]);
    let fe = FrontEnd::new();
    for _ in 0..20 {
        let u = synth::utterance(&mut rng, 100);
        assert_eq!(u.labels.len(), 100);
        assert_eq!(u.samples.len(), samples_for(100));
        assert_eq!(u.labels[0], 0, "utterances start with silence");
        for (t, &c) in u.labels.iter().enumerate() {
            let p = fe.power_spectrum(&u.samples[t * HOP..t * HOP + WIN]);
            let total: f64 = p.iter().map(|&x| x as f64).sum();
            // Share of the power above 4 kHz (bin 128 of 257).
            let above: f64 = p[128..].iter().map(|&x| x as f64).sum();
            energy[c as usize] += total.ln();
            high[c as usize] += above / total;
            count[c as usize] += 1;
        }
    }
    let mean = |v: &[f64; N_CLASSES], c: usize| v[c] / count[c].max(1) as f64;
    assert!(
        count.iter().all(|&n| n > 0),
        "every class occurs: {count:?}"
    );
    let (sil, a, s) = (0, 1, 6);
    assert_eq!(synth::class_name(sil), "sil");
    assert_eq!(synth::class_name(s), "s");
    // Silence is far quieter than a vowel; /s/ puts most of its power above 4 kHz, /a/ little.
    assert!(mean(&energy, a) > mean(&energy, sil) + 4.0);
    assert!(mean(&high, s) > 0.5, "/s/ above 4 kHz: {}", mean(&high, s));
    assert!(mean(&high, a) < 0.1, "/a/ above 4 kHz: {}", mean(&high, a));
}
