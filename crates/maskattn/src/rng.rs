//! A small seeded generator for reproducible test data, dropout seeds and training runs.

/// SplitMix64 (Steele, Lea and Flood 2014, as in `java.util.SplittableRandom`): a 64-bit
/// state advanced by a fixed odd constant and hashed. Its stream depends on the seed
/// alone — never on the version, the machine or the thread — so data drawn from it (a test
/// case, a training run and its resumption) is the same everywhere. Not for cryptography.
///
/// ```
/// let mut a = maskattn::SplitMix64::new(7);
/// let mut b = maskattn::SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// // The first output for seed 0, as published with the algorithm.
/// assert_eq!(maskattn::SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 53 bits of [`SplitMix64::next_u64`].
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
