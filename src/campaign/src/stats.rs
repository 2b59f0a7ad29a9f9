//! Rates with confidence intervals, and latency percentiles.
//!
//! A campaign's outcome rate is a binomial proportion estimated from a few dozen to a
//! few thousand runs, often near 0 or 1, where the normal ("Wald") interval is wrong
//! and can leave [0, 1]. The Wilson score interval stays inside [0, 1], is never empty
//! at 0 or n successes and keeps close to its nominal coverage for small n, which is
//! why fault-injection studies report it.

/// z for a two-sided 95 % interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval (low, high) for `k` successes in `n` trials at quantile
/// `z`; (0, 1) when there are no trials.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let k = k.min(n) as f64;
    let n = n as f64;
    let p = k / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The `p`-th percentile (0..=100) of `values` by the nearest-rank method; None when
/// there are none.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-4
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998), Table I: 81/263 → 0.2553–0.3662; 15/148 → 0.0624–0.1605;
        // 0/20 → 0–0.1611; 1/29 → 0.0061–0.1718.
        for (k, n, lo, hi) in [
            (81, 263, 0.2553, 0.3662),
            (15, 148, 0.0624, 0.1605),
            (0, 20, 0.0, 0.1611),
            (1, 29, 0.0061, 0.1718),
        ] {
            let (l, h) = wilson(k, n, Z95);
            assert!(close(l, lo) && close(h, hi), "{k}/{n}: {l:.4}–{h:.4}");
        }
        assert_eq!(wilson(0, 0, Z95), (0.0, 1.0));
        let (l, h) = wilson(20, 20, Z95);
        assert!(close(h, 1.0) && close(l, 1.0 - 0.1611));
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert_eq!(percentile(&v, 5.0), Some(15.0));
        assert_eq!(percentile(&v, 30.0), Some(20.0));
        assert_eq!(percentile(&v, 40.0), Some(20.0));
        assert_eq!(percentile(&v, 50.0), Some(35.0));
        assert_eq!(percentile(&v, 100.0), Some(50.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[f64::NAN, 3.0], 50.0), Some(3.0));
    }

    proptest::proptest! {
        #[test]
        fn wilson_contains_the_estimate(k in 0u64..500, extra in 0u64..500) {
            let n = k + extra;
            let (l, h) = wilson(k, n, Z95);
            proptest::prop_assert!((0.0..=1.0).contains(&l) && (0.0..=1.0).contains(&h));
            if n > 0 {
                let p = k as f64 / n as f64;
                proptest::prop_assert!(l <= p + 1e-12 && p <= h + 1e-12);
            }
        }
    }
}
