//! Durations as policy authors write them: `30s`, `15m`, `1h`, `2d`, or a plain number of seconds.
//!
//! Only one number and one unit: no `1h30m`, no fractions, no months (their length varies). Whether zero is
//! acceptable is the caller's business (an approval timeout refuses it).

use std::time::Duration;

/// Parses `30s`, `15m`, `1h`, `2d` or plain integer seconds (`900`). Surrounding spaces are ignored.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "invalid duration `{text}`: expected a whole number with an optional unit s, m, h or d (e.g. 30s, 15m, 1h, 2d)"
        ));
    }
    let value: u64 = number.parse().map_err(|_| format!("invalid duration `{text}`: the number is too large"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        other => {
            return Err(format!(
                "invalid duration `{text}`: unknown unit `{other}`; use s, m, h or d (e.g. 30s, 15m, 1h, 2d)"
            ));
        }
    };
    value
        .checked_mul(multiplier)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("invalid duration `{text}`: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172_800), ("900", 900), (" 5 m ", 300), ("0", 0)];
        for (text, seconds) in ok {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(seconds)), "{text}");
        }
        for bad in ["", "m", "1.5h", "-1s", "10w", "1h30m", "99999999999999999999", "18446744073709551615d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
