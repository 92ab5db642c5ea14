//! The wall clock, and how the service writes times and durations for people and for the
//! status: milliseconds since the epoch (the unit of `ChangeEvent::executed_at`
//! and of every age and lag measured against it), RFC 3339 with milliseconds in UTC (every
//! `*_since`/`*_at` field of the status and the envelope's `published_at`), and the short
//! durations of the `status` screen.
//!
//! Owns no state and imports nothing from the crate, so any module may use it. Cannot fail: a
//! clock set before 1970 reads as 0, and a duration that is not a number is shown as `-`.

use chrono::{DateTime, SecondsFormat, Utc};
use std::time::Duration;

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `t` as RFC 3339 with milliseconds, in UTC: `2023-11-14T22:13:21.456Z`.
pub fn rfc3339_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, as [`rfc3339_ms`] writes it.
pub fn now_rfc3339() -> String {
    rfc3339_ms(Utc::now())
}

/// The wall-clock time `elapsed` ago (an [`std::time::Instant`]'s age), as [`rfc3339_ms`]
/// writes it.
pub fn rfc3339_ago(elapsed: Duration) -> String {
    let ago = chrono::Duration::from_std(elapsed).unwrap_or_default();
    rfc3339_ms(Utc::now() - ago)
}

/// `1d01h`, `1h02m`, `3m05s`, `4.2s`, `120ms`; `-` for a negative or non-finite number.
pub fn short_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let whole = secs as u64;
    if secs < 1.0 {
        format!("{}ms", (secs * 1000.0).round() as u64)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else if whole < 86400 {
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    } else {
        format!("{}d{:02}h", whole / 86400, (whole % 86400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(0.12), "120ms");
        assert_eq!(short_duration(4.25), "4.2s");
        assert_eq!(short_duration(185.0), "3m05s");
        assert_eq!(short_duration(3720.0), "1h02m");
        assert_eq!(short_duration(90000.0), "1d01h");
        assert_eq!(short_duration(-1.0), "-");
        assert_eq!(short_duration(f64::NAN), "-");
    }

    #[test]
    fn rfc3339_with_milliseconds_in_utc() {
        // 1_700_000_001_456 ms: `date -u -d @1700000001.456 +%FT%T.%3NZ`
        let t = DateTime::from_timestamp_millis(1_700_000_001_456).expect("in range");
        assert_eq!(rfc3339_ms(t), "2023-11-14T22:13:21.456Z");
    }

    #[test]
    fn now_and_ago_agree() {
        let before = now_ms();
        let text = now_rfc3339();
        let parsed = DateTime::parse_from_rfc3339(&text).expect("RFC 3339");
        assert!(
            parsed.timestamp_millis() >= before,
            "{text} before {before}"
        );
        let ago = DateTime::parse_from_rfc3339(&rfc3339_ago(Duration::from_secs(3600)))
            .expect("RFC 3339");
        let diff = parsed.timestamp_millis() - ago.timestamp_millis();
        assert!((3_599_000..=3_601_000).contains(&diff), "{diff} ms");
    }
}
