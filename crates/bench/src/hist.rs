//! A log-linear latency histogram in microseconds (about 1.5% resolution), mergeable.

/// Sub-buckets per power of two.
const SUB: usize = 64;
/// Powers of two covered: 1 µs to about 2^36 µs (19 hours).
const POWERS: usize = 36;

/// Counts of values, by bucket.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; SUB * POWERS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(value: u64) -> usize {
    if value < SUB as u64 {
        return value as usize;
    }
    let power = 63 - value.leading_zeros() as usize; // >= 6
    let shift = power - 6;
    let sub = ((value >> shift) as usize) - SUB; // 0..SUB
    ((power - 5) * SUB + sub).min(SUB * POWERS - 1)
}

fn lower_bound(index: usize) -> u64 {
    if index < SUB {
        return index as u64;
    }
    let power = index / SUB + 5;
    let sub = index % SUB;
    ((SUB + sub) as u64) << (power - 6)
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.counts[bucket(value)] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), as the lower bound of its bucket; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return lower_bound(i).min(self.max);
            }
        }
        self.max
    }

    /// The largest value recorded.
    pub fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.999, 99_900.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.quantile(0.0), 1);
    }

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 10_000, 1 << 30] {
            let b = bucket(v);
            assert!(b >= last);
            assert!(lower_bound(b) <= v, "{v}");
            last = b;
        }
    }
}
