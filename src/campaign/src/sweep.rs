//! Sweeps: parameters given as lists or ranges, expanded into the cross product.
//!
//! A swept value is a TOML array (`count = [1, 2, 4]`) or a range string
//! (`"range:LO..HI"` or `"range:LO..HI:STEP"`, inclusive, integers). The expansion is
//! in the order the axes are given, the last axis varying fastest, so a point's index
//! is stable for a given file: the run ID names it.

use serde_json::Value;

/// Values one axis takes at most, and points one sweep makes at most.
pub const MAX_POINTS: usize = 100_000;

/// One swept parameter: its key (e.g. `vcpus` or `fault.1.count`) and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// Where the value goes.
    pub key: String,
    /// The values, in order.
    pub values: Vec<Value>,
}

/// A sweep could not be expanded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SweepError {
    /// A range string is malformed.
    #[error("'{0}': use range:LO..HI or range:LO..HI:STEP with integers, LO <= HI, STEP >= 1")]
    Range(String),
    /// An empty list.
    #[error("an empty list sweeps nothing")]
    Empty,
    /// Too many points.
    #[error("the sweep has more than {MAX_POINTS} points")]
    TooLarge,
}

fn int(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The values of a swept parameter written as `v`: a list, a range string, or (not
/// swept) None.
pub fn values(v: &Value) -> Result<Option<Vec<Value>>, SweepError> {
    match v {
        Value::Array(a) if a.is_empty() => Err(SweepError::Empty),
        Value::Array(a) => Ok(Some(a.clone())),
        Value::String(s) => match s.strip_prefix("range:") {
            None => Ok(None),
            Some(r) => {
                let bad = || SweepError::Range(s.clone());
                let (span, step) = match r.split_once(':') {
                    Some((span, step)) => (span, int(step).ok_or_else(bad)?),
                    None => (r, 1),
                };
                let (lo, hi) = span.split_once("..").ok_or_else(bad)?;
                let (lo, hi) = (int(lo).ok_or_else(bad)?, int(hi).ok_or_else(bad)?);
                if hi < lo || step < 1 {
                    return Err(bad());
                }
                let n = (hi - lo) / step + 1;
                if n as u64 > MAX_POINTS as u64 {
                    return Err(SweepError::TooLarge);
                }
                Ok(Some((0..n).map(|i| Value::from(lo + i * step)).collect()))
            }
        },
        _ => Ok(None),
    }
}

/// The points of the cross product of `axes`: each a list of (key, value), in axis
/// order, the last axis varying fastest. No axes: one empty point.
pub fn expand(axes: &[Axis]) -> Result<Vec<Vec<(String, Value)>>, SweepError> {
    let mut total: usize = 1;
    for a in axes {
        if a.values.is_empty() {
            return Err(SweepError::Empty);
        }
        total = total
            .checked_mul(a.values.len())
            .filter(|&t| t <= MAX_POINTS)
            .ok_or(SweepError::TooLarge)?;
    }
    let mut points = Vec::with_capacity(total);
    for mut i in 0..total {
        let mut p = Vec::with_capacity(axes.len());
        for a in axes.iter().rev() {
            p.push((a.key.clone(), a.values[i % a.values.len()].clone()));
            i /= a.values.len();
        }
        p.reverse();
        points.push(p);
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ranges_lists_and_scalars() {
        assert_eq!(
            values(&json!("range:1..4")),
            Ok(Some(vec![json!(1), json!(2), json!(3), json!(4)]))
        );
        assert_eq!(
            values(&json!("range:0x20..0x40:16")),
            Ok(Some(vec![json!(32), json!(48), json!(64)]))
        );
        assert_eq!(
            values(&json!([1, "a"])),
            Ok(Some(vec![json!(1), json!("a")]))
        );
        assert_eq!(
            values(&json!("rand:1..4")),
            Ok(None),
            "a random draw is not a sweep"
        );
        assert_eq!(values(&json!(7)), Ok(None));
        for bad in ["range:4..1", "range:1..x", "range:1..4:0", "range:1-4"] {
            assert!(
                matches!(values(&json!(bad)), Err(SweepError::Range(_))),
                "{bad}"
            );
        }
        assert_eq!(values(&json!([])), Err(SweepError::Empty));
        assert_eq!(
            values(&json!("range:0..10000000")),
            Err(SweepError::TooLarge)
        );
    }

    #[test]
    fn cross_product_in_a_stable_order() {
        let axes = vec![
            Axis {
                key: "a".into(),
                values: vec![json!(1), json!(2)],
            },
            Axis {
                key: "b".into(),
                values: vec![json!("x"), json!("y"), json!("z")],
            },
        ];
        let p = expand(&axes).expect("expand");
        assert_eq!(p.len(), 6);
        assert_eq!(p[0], vec![("a".into(), json!(1)), ("b".into(), json!("x"))]);
        assert_eq!(p[1], vec![("a".into(), json!(1)), ("b".into(), json!("y"))]);
        assert_eq!(p[5], vec![("a".into(), json!(2)), ("b".into(), json!("z"))]);
        assert_eq!(expand(&[]).expect("none"), vec![Vec::new()]);
        let big: Vec<Axis> = (0..6)
            .map(|i| Axis {
                key: format!("k{i}"),
                values: (0..10).map(|v| json!(v)).collect(),
            })
            .collect();
        assert_eq!(expand(&big), Err(SweepError::TooLarge));
    }
}
