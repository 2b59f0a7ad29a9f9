//! Parsing of memory sizes such as `512M`, `1G`, `1536MiB` or a bare number of MiB.

/// Parses a size into bytes. Suffixes K, M, G, T (optionally followed by `iB` or `B`) are
/// powers of 1024; a bare number means MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err("expected a number such as 512M or 2G".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let unit = unit.trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" if unit.is_empty() => 20,
        "K" => 10,
        "M" | "" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit '{unit}' (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("65536K"), Ok(64 << 20));
        assert_eq!(parse_size("1536mb"), Ok(1536 << 20));
        for bad in [
            "",
            "M",
            "1X",
            "-5M",
            "1.5G",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
