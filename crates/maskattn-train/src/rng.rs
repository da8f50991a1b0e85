//! SplitMix64: a seeded generator whose stream never changes between versions or machines,
//! so that a run (and a resumed run) sees exactly the same data.

use maskattn::SplitMix64;

/// The training run's draws: the kernel crate's [`SplitMix64`] stream, plus the few shapes
/// of draw the data and the initialisation need.
#[derive(Clone, Debug)]
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed))
    }

    /// A generator for one purpose at one step, independent of the others: the state after
    /// one draw from `seed ^ purpose·C1`, mixed with that draw and the step.
    pub fn at(seed: u64, purpose: u64, step: u64) -> Self {
        let start = seed ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let first = SplitMix64::new(start).next_u64();
        // `SplitMix64` adds its constant before hashing: the state after that first draw.
        let state = start.wrapping_add(0x9E37_79B9_7F4A_7C15);
        Rng(SplitMix64::new(
            state ^ first ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.unit().max(f64::MIN_POSITIVE);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    /// The stream every saved run was drawn from, written out on its own: a change here
    /// would silently change every run's data and make old checkpoints resume differently.
    fn old_at(seed: u64, purpose: u64, step: u64) -> impl FnMut() -> u64 {
        let mut s = seed ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let next = move |s: &mut u64| {
            *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let first = next(&mut s);
        s ^= first ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        move || next(&mut s)
    }

    #[test]
    fn purpose_streams_are_the_ones_runs_were_drawn_from() {
        for (seed, purpose, step) in [(0, 0, 0), (1, 2, 3), (u64::MAX, 7, 1 << 40)] {
            let mut old = old_at(seed, purpose, step);
            let mut new = Rng::at(seed, purpose, step);
            for _ in 0..64 {
                assert_eq!(new.next_u64(), old());
            }
        }
    }
}
