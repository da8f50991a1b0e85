//! `t5_bucket` and `alibi_slopes` against tables generated from Hugging Face's own code
//! (`data/hf_tables.py`: T5's `_relative_position_bucket` and BLOOM's `build_alibi_tensor`),
//! value for value, bucket boundaries included.

use maskattn::{alibi_slopes, t5_bucket, RelBias};

const TABLE: &str = include_str!("data/hf_tables.txt");
/// The relative positions the script covers.
const REL: std::ops::RangeInclusive<i64> = -1100..=1100;

#[test]
fn t5_buckets_match_hugging_face() {
    let mut configs = 0;
    for line in TABLE.lines().filter(|l| l.starts_with("t5 ")) {
        let mut it = line.split_whitespace().skip(1);
        let mut num = || it.next().unwrap().parse::<usize>().unwrap();
        let (bidir, n, m) = (num() == 1, num(), num());
        let want: Vec<usize> = line
            .split_whitespace()
            .skip(4)
            .flat_map(|run| {
                let (b, c) = run.split_once('*').unwrap();
                std::iter::repeat_n(b.parse().unwrap(), c.parse().unwrap())
            })
            .collect();
        assert_eq!(want.len(), REL.count(), "{line:.40}");
        for (rel, &w) in REL.zip(&want) {
            let got = t5_bucket(rel, bidir, n, m);
            assert_eq!(
                got, w,
                "t5_bucket({rel}, bidirectional = {bidir}, {n}, {m}) = {got}, HF says {w}"
            );
        }
        // RelBias reads the same buckets.
        let table = vec![0f32; n];
        let rb = RelBias::new(&table, n, m, bidir).unwrap();
        assert!(REL.zip(&want).all(|(rel, &w)| rb.bucket(rel) == w));
        configs += 1;
    }
    assert_eq!(configs, 11, "the table lists 11 settings");
}

/// BLOOM's slopes come from `torch.pow` on f32, whose CPU kernel (SLEEF, 1-ulp accuracy)
/// is not correctly rounded; ours round the exact power of the same f32 base once. So the
/// two agree to within one ulp (most bit for bit; the test says how many).
#[test]
fn alibi_slopes_match_bloom() {
    let (mut seen, mut exact, mut total) = (0, 0, 0);
    for line in TABLE.lines().filter(|l| l.starts_with("alibi ")) {
        let mut it = line.split_whitespace().skip(1);
        let heads: usize = it.next().unwrap().parse().unwrap();
        let want: Vec<f32> = it
            .map(|x| f32::from_bits(x.parse::<i32>().unwrap() as u32))
            .collect();
        let got = alibi_slopes(heads);
        assert_eq!(got.len(), heads);
        for (h, (g, w)) in got.iter().zip(&want).enumerate() {
            let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
            assert!(
                ulps <= 1,
                "{heads} heads, head {h}: {g} vs BLOOM's {w} ({ulps} ulp)"
            );
            exact += (ulps == 0) as usize;
            total += 1;
        }
        seen += 1;
    }
    assert_eq!(seen, 40);
    println!("alibi slopes: {exact} of {total} bit-identical to BLOOM's, the rest 1 ulp apart");
}

#[test]
fn rel_bias_rejects_what_t5_cannot_mean() {
    let t = vec![0f32; 32];
    assert!(RelBias::new(&t, 32, 128, true).is_ok());
    // Too few buckets for an exact range (both ways), a table that is not
    // [num_buckets, H], max_distance inside the exact range.
    for (n, m, bidir) in [(2, 8, true), (1, 8, false), (5, 128, false), (32, 8, true)] {
        let e = RelBias::new(&t, n, m, bidir);
        assert!(e.is_err(), "RelBias::new(_, {n}, {m}, {bidir}) must fail");
        println!("{}", e.unwrap_err());
    }
}
