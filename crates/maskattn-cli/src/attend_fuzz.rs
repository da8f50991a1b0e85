//! A fuzz test of `attend`'s input loading: random and mutated safetensors files, driven
//! through [`compute`](super::compute) with every kind of mask term, must each end in a
//! result or an error — never a panic.
//!
//! Random bytes alone rarely get past the header check, so most cases are *structured*: a
//! well-formed header naming the tensors attend reads, with dtypes, ranks and dimensions
//! drawn to hit the edges (zero and huge dimensions, the wrong dtype, shapes that disagree,
//! lengths and ids out of range), data of the right size (or not), and then, for some, bytes
//! of the file flipped, cut or repeated. The test runs a fixed number of seeded cases; set
//! `MASKATTN_FUZZ_SECS` to run for that many seconds instead (a longer hunt), and
//! `MASKATTN_FUZZ_SEED` to start elsewhere. A panicking input is written to the temporary
//! folder and its path is part of the failure message, so it can be replayed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::mask_expr;

/// splitmix64: small, seedable, good enough to spread cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const DTYPES: [(&str, usize); 8] = [
    ("F32", 4),
    ("I64", 8),
    ("U8", 1),
    ("I32", 4),
    ("BF16", 2),
    ("F16", 2),
    ("F64", 8),
    ("BOOL", 1),
];

/// Mask expressions covering every term that reads the file, and the plain ones.
const MASKS: [&str; 10] = [
    "full",
    "causal",
    "key-padding",
    "documents",
    "dense",
    "causal & key-padding & documents & dense",
    "window(2, 1) & key-padding",
    "prefix(3) & documents",
    "neighbourhood(2, 3, 1)",
    "block-causal(2) & chunks(3) & causal-top-left",
];

/// An edge value for a dimension: 0, 1, another small size, or huge.
fn edge_dim(r: &mut Rng) -> usize {
    match r.below(5) {
        0 => 0,
        1 => 1,
        2 => 1 << r.below(63),
        3 => usize::MAX,
        _ => 2 + r.below(7) as usize,
    }
}

/// Element bytes of `n` values of `dtype`: values that matter to attend for the integer
/// tensors (lengths, ids: small, negative, huge), arbitrary bits otherwise, with NaN and ∞
/// among the floats.
fn values(r: &mut Rng, dtype: &str, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        match dtype {
            "F32" => {
                let x = match r.below(30) {
                    0 if r.chance(10) => f32::NAN,
                    1 if r.chance(10) => f32::INFINITY,
                    2 if r.chance(10) => f32::MAX,
                    3 if r.chance(10) => f32::from_bits(r.next() as u32),
                    _ => (r.below(2000) as f32 - 1000.0) / 250.0,
                };
                out.extend(x.to_le_bytes());
            }
            "I64" => {
                // Lengths and ids: mostly in range (L <= 9), sometimes far out of it.
                let x: i64 = match r.below(40) {
                    0 => -1 - r.below(5) as i64,
                    1 => i64::MAX,
                    2 => i64::MIN,
                    3 => r.next() as i64,
                    _ => r.below(10) as i64,
                };
                out.extend(x.to_le_bytes());
            }
            _ => {
                let size = DTYPES.iter().find(|d| d.0 == dtype).map_or(1, |d| d.1);
                out.extend((0..size).map(|_| r.next() as u8));
            }
        }
    }
    out
}

/// Data for a tensor of `dtype` and `shape`: the size the shape says, unless that would be
/// large — then the tensor is made empty by a zero in one dimension, keeping the huge ones
/// beside it (the case of `[0, 2^62, ...]`, which passes the size check).
fn data_for(r: &mut Rng, dtype: &str, shape: &mut [usize]) -> Vec<u8> {
    let size = DTYPES.iter().find(|d| d.0 == dtype).map_or(1, |d| d.1);
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(size));
    match n {
        Some(n) if n <= 1 << 16 => values(r, dtype, n / size),
        _ => {
            let i = r.below(shape.len().max(1) as u64) as usize;
            if let Some(d) = shape.get_mut(i) {
                *d = 0;
            }
            Vec::new()
        }
    }
}

/// A structured input file: the tensors of one attention problem (the optional ones now and
/// then), right as attend wants them, and then a few edges — a dtype, a dimension, a rank,
/// a missing tensor, the wrong amount of data.
fn structured(r: &mut Rng) -> Vec<u8> {
    let (b, hkv) = (1 + r.below(3) as usize, 1 + r.below(2) as usize);
    let hq = hkv * (1 + r.below(2) as usize);
    let (lq, d) = (1 + r.below(9) as usize, 1 + r.below(8) as usize);
    let lk = if r.chance(50) {
        lq
    } else {
        1 + r.below(9) as usize
    };
    let rows = if r.chance(50) { 1 } else { b };
    let mut entries: Vec<(&str, &str, Vec<usize>)> = Vec::new();
    for (name, shape, dtype, percent) in [
        ("q", vec![b, hq, lq, d], "F32", 100),
        ("k", vec![b, hkv, lk, d], "F32", 100),
        ("v", vec![b, hkv, lk, d], "F32", 100),
        ("dout", vec![b, hq, lq, d], "F32", 40),
        ("key_lengths", vec![b], "I64", 50),
        ("doc_ids", vec![rows, lq], "I64", 40),
        ("q_doc_ids", vec![rows, lq], "I64", 20),
        ("k_doc_ids", vec![rows, lk], "I64", 20),
        (
            "mask",
            vec![1, if r.chance(50) { 1 } else { hq }, lq, lk],
            "U8",
            40,
        ),
        // The score modifiers.
        (
            "bias",
            vec![if r.chance(50) { 1 } else { b }, hq, lq, lk],
            "F32",
            20,
        ),
        ("alibi_slopes", vec![hq], "F32", 20),
        ("sinks", vec![hq], "F32", 20),
        ("rel_bias", vec![RELS, hq], "F32", 15),
    ] {
        if r.chance(percent) {
            entries.push((name, dtype, shape));
        }
    }
    let edges = *r.pick(&[0, 0, 1, 1, 1, 2, 2, 3]);
    let mut short = vec![false; entries.len()];
    for _ in 0..edges {
        let i = r.below(entries.len() as u64) as usize;
        let (_, dtype, shape) = &mut entries[i];
        match r.below(5) {
            0 => *dtype = r.pick(&DTYPES).0,
            1 | 2 => {
                if !shape.is_empty() {
                    let at = r.below(shape.len() as u64) as usize;
                    shape[at] = edge_dim(r);
                }
            }
            3 => {
                if r.chance(50) || shape.is_empty() {
                    shape.push(edge_dim(r));
                } else {
                    shape.remove(r.below(shape.len() as u64) as usize);
                }
            }
            _ => short[i] = true,
        }
    }
    if edges > 0 && r.chance(10) {
        entries.remove(r.below(entries.len() as u64) as usize);
        short.pop();
    }
    let mut header = serde_json::Map::new();
    let mut body: Vec<u8> = Vec::new();
    for ((name, dtype, mut shape), short) in entries.into_iter().zip(short) {
        let mut data = data_for(r, dtype, &mut shape);
        if short {
            // The wrong amount of data for the shape.
            if r.chance(50) {
                data.truncate(data.len().saturating_sub(1 + r.below(4) as usize));
            } else {
                data.push(r.next() as u8);
            }
        }
        let start = body.len();
        body.extend(&data);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, body.len()]}),
        );
    }
    if r.chance(10) {
        header.insert("__metadata__".into(), serde_json::json!({"note": "fuzz"}));
    }
    let header = serde_json::Value::Object(header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(body);
    file
}

/// Flips, overwrites, cuts or repeats some bytes (in the header most of the time: that is
/// where the structure is).
fn mutate(r: &mut Rng, file: &mut Vec<u8>) {
    for _ in 0..1 + r.below(4) {
        if file.is_empty() {
            file.push(r.next() as u8);
        }
        let header_end = (8 + u64::from_le_bytes(
            file.get(..8)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        ))
        .min(file.len() as u64) as usize;
        let at = if r.chance(80) && header_end > 0 {
            r.below(header_end as u64) as usize
        } else {
            r.below(file.len() as u64) as usize
        };
        match r.below(6) {
            0 => file[at] ^= 1 << r.below(8),
            1 => file[at] = *r.pick(b"0123456789-[],:\"{}e.E "),
            2 => file.truncate(at),
            3 => {
                let end = (at + 1 + r.below(16) as usize).min(file.len());
                let piece = file[at..end].to_vec();
                file.splice(at..at, piece);
            }
            4 => {
                let digits = (r.next() >> r.below(64)).to_string();
                file.splice(at..at, digits.into_bytes());
            }
            _ => {
                let len = r.next().to_le_bytes();
                let n = 8.min(file.len());
                file[..n].copy_from_slice(&len[..n]);
            }
        }
    }
}

/// Buckets of the fuzz's `rel_bias` tables.
const RELS: usize = 4;

fn case(r: &mut Rng) -> (Vec<u8>, &'static str, super::Options) {
    let mut file = match r.below(10) {
        0 => (0..r.below(64)).map(|_| r.next() as u8).collect(),
        _ => structured(r),
    };
    if r.chance(15) {
        mutate(r, &mut file);
    }
    let opts = super::Options {
        scale: None,
        softcap: r.chance(20).then_some(*r.pick(&[0.5, 30.0])),
        // A bucketing as often as the files hold `rel_bias` (mostly the right one), so that
        // both agree about as often as they disagree in each way.
        rel: match r.below(20) {
            0..=2 => Some((RELS, 1 + r.below(20) as usize, r.chance(50))),
            3 => Some((
                *r.pick(&[0, 1, RELS + 1]),
                r.below(20) as usize,
                r.chance(50),
            )),
            _ => None,
        },
    };
    (file, *r.pick(&MASKS), opts)
}

/// Runs one input: `Ok(true)` for a result, `Ok(false)` for an error (the error text in
/// `errors`); `Err` carries the panic message.
fn run_one(bytes: &[u8], mask: &str, opts: &super::Options) -> Result<Option<String>, String> {
    let terms = mask_expr::parse(mask).expect("the fuzz masks parse");
    catch_unwind(AssertUnwindSafe(|| {
        let r = super::compute(
            bytes,
            "fuzz.safetensors",
            |d| mask_expr::build(&terms, d),
            opts,
        );
        // A result is a fine outcome; so is an error, if it is one line.
        r.err().map(|e| {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "a multi-line error: {msg}");
            msg
        })
    }))
    .map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn attend_inputs_never_panic() {
    let secs: Option<u64> = std::env::var("MASKATTN_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed: u64 = std::env::var("MASKATTN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    // The panic hook would print every caught panic; the failure message says it instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut r = Rng(seed);
    let (mut n, mut computed, mut failures) = (0u64, 0u64, Vec::new());
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    while deadline.map_or(n < 1500, |d| Instant::now() < d) {
        let (bytes, mask, opts) = case(&mut r);
        match run_one(&bytes, mask, &opts) {
            Ok(None) => computed += 1,
            // Counted by their first words (numbers and lists left out), to show which checks the
            // cases reach.
            Ok(Some(e)) => {
                *errors
                    .entry(
                        e.chars()
                            .take_while(|&c| c != '(')
                            .filter(|c| !c.is_ascii_digit())
                            .take(60)
                            .collect(),
                    )
                    .or_default() += 1
            }
            Err(msg) => {
                let path = std::env::temp_dir().join(format!("attend-fuzz-{seed}-{n}.safetensors"));
                let _ = std::fs::write(&path, &bytes);
                failures.push(format!(
                    "case {n} (mask {mask:?}, {opts:?}, input {}): {msg}",
                    path.display()
                ));
                if failures.len() >= 5 {
                    break;
                }
            }
        }
        n += 1;
    }
    std::panic::set_hook(hook);
    eprintln!("attend fuzz: {n} cases from seed {seed}, {computed} computed; errors:");
    for (e, c) in &errors {
        eprintln!("{c:>8}  {e}");
    }
    assert!(
        failures.is_empty(),
        "{} panics:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A harness whose cases all stop at the header would test nothing past it.
    assert!(
        computed * 20 >= n,
        "only {computed} of {n} cases were computed"
    );
}
