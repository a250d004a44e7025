//! How `top` writes its figures: short enough for a terminal column, exact where it matters
//! (counters are whole numbers, never rounded).

/// A missing figure.
pub const NONE: &str = "-";

/// A value that may be missing.
pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| NONE.to_string(), |v| v.to_string())
}

/// A per-second rate with an SI prefix: `0`, `950`, `12.3k`, `4.56M`, `1.20G`.
pub fn rate(v: Option<f64>) -> String {
    let Some(v) = v else {
        return NONE.to_string();
    };
    if v < 1e3 {
        format!("{v:.0}")
    } else if v < 1e6 {
        format!("{:.1}k", v / 1e3)
    } else if v < 1e9 {
        format!("{:.2}M", v / 1e6)
    } else {
        format!("{:.2}G", v / 1e9)
    }
}

/// A size in bytes with a binary prefix: `512 B`, `12.0 KiB`, `3.20 MiB`.
pub fn bytes(v: Option<u64>) -> String {
    let Some(v) = v else {
        return NONE.to_string();
    };
    let f = v as f64;
    if v < 1024 {
        format!("{v} B")
    } else if f < 1024.0 * 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else if f < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} MiB", f / (1024.0 * 1024.0))
    } else {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    }
}

/// A duration in seconds: `12.3 s`, `4m05s`, `2h03m`.
pub fn secs(v: Option<f64>) -> String {
    let Some(v) = v else {
        return NONE.to_string();
    };
    let whole = v as u64;
    if v < 60.0 {
        format!("{v:.1} s")
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, whole % 3600 / 60)
    }
}

/// An event time (ns since the Unix epoch) in UTC, to the millisecond:
/// `2024-09-21 00:00:59.999`. `-` for none or 0 (nothing merged yet).
pub fn utc_ns(v: Option<u64>) -> String {
    match v {
        None | Some(0) => NONE.to_string(),
        Some(ns) => utc_ms(ns / 1_000_000),
    }
}

/// Unix time in ms as `YYYY-MM-DD hh:mm:ss.mmm` (UTC).
pub fn utc_ms(ms: u64) -> String {
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    let (y, m, d) = civil_from_days(days as i64);
    let s = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        ms_of_day % 1000
    )
}

/// Unix time in ms as `hh:mm:ss` (UTC).
pub fn clock_ms(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// The proleptic Gregorian date (year, month, day) of a day count since 1970-01-01.
///
/// Counts in 400-year eras of 146 097 days whose years start on March 1st, so that the leap
/// day is the last day of a year; then maps March-based months back to January-based ones.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // 1970-01-01 is day 719 468 after 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(950.4)), "950");
        assert_eq!(rate(Some(12_345.0)), "12.3k");
        assert_eq!(rate(Some(4_560_000.0)), "4.56M");
        assert_eq!(bytes(Some(512)), "512 B");
        assert_eq!(bytes(Some(12 * 1024)), "12.0 KiB");
        assert_eq!(bytes(Some(3 << 20)), "3.00 MiB");
        assert_eq!(secs(Some(12.34)), "12.3 s");
        assert_eq!(secs(Some(245.0)), "4m05s");
        assert_eq!(secs(Some(7380.0)), "2h03m");
        assert_eq!(opt(Some(3)), "3");
        assert_eq!(opt::<u8>(None), "-");
    }

    #[test]
    fn event_times_in_utc() {
        assert_eq!(utc_ns(Some(0)), "-");
        assert_eq!(utc_ms(0), "1970-01-01 00:00:00.000");
        // The close of the first kline of the bundled day.
        assert_eq!(
            utc_ns(Some(1_726_876_859_999_000_000)),
            "2024-09-21 00:00:59.999"
        );
        // Leap days and the ends of months and years.
        assert_eq!(utc_ms(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(utc_ms(1_709_251_199_000), "2024-02-29 23:59:59.000");
        assert_eq!(utc_ms(1_735_689_599_999), "2024-12-31 23:59:59.999");
        assert_eq!(clock_ms(1_735_689_599_999), "23:59:59");
    }
}
