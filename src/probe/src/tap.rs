//! TAP-style reporting and scenario-name patterns.

use alloc::string::String;

/// A scenario's result.
#[derive(Debug)]
pub enum Outcome {
    /// Passed, with an optional note.
    Pass(Option<String>),
    /// Failed, with why.
    Fail(String),
    /// Not applicable here, with why.
    Skip(String),
}

/// Fails the scenario with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { return $crate::tap::Outcome::Fail(alloc::format!($($arg)*)) };
}

/// Skips the scenario with a formatted reason.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => { return $crate::tap::Outcome::Skip(alloc::format!($($arg)*)) };
}

/// Fails unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)*) => { if !$cond { $crate::fail!($($arg)*); } };
}

/// Whether `name` matches `pat`, where `*` matches any run of characters.
pub fn matches(pat: &str, name: &str) -> bool {
    let (p, n) = (pat.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}
