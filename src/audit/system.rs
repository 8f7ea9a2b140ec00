//! Who, where and when: the facts every entry carries, from the system.

use std::time::{SystemTime, UNIX_EPOCH};

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
}

impl Utc {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self::from_unix_millis(since.as_millis() as i64)
    }

    pub fn from_unix_secs(secs: u64) -> Self {
        Self::from_unix_millis(
            i64::try_from(secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
        )
    }

    pub fn from_unix_millis(ms: i64) -> Self {
        let secs = ms.div_euclid(1000);
        let millis = ms.rem_euclid(1000) as u32;
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Utc {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day / 60 % 60,
            second: of_day % 60,
            millis,
        }
    }

    /// RFC 3339 with milliseconds: `2025-03-01T12:34:56.789Z`.
    pub fn rfc3339(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }

    /// The RFC 3164 (BSD syslog) timestamp: `Mar  1 12:34:56`.
    pub fn rfc3164(&self) -> String {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        format!(
            "{} {:>2} {:02}:{:02}:{:02}",
            MONTHS[(self.month as usize).saturating_sub(1) % 12],
            self.day,
            self.hour,
            self.minute,
            self.second
        )
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar: shift the year to start in March so the leap day comes last,
/// then count 400-year eras, years of the era and days of the year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// This machine's host name (empty if it cannot be read).
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its length; gethostname NUL-terminates
    // within it (or truncates, which we tolerate).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// The real user id of this process and its name from the user database.
pub(crate) fn user() -> (u32, Option<String>) {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    (uid, user_name(uid))
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data that getpwuid_r fills in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the strings getpwuid_r
    // stores in `pwd` point into `buf`, which outlives their use below.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(
            Utc::from_unix_millis(0).rfc3339(),
            "1970-01-01T00:00:00.000Z"
        );
        // 2000-02-29 (a leap day in a century leap year) 12:00:00.5
        assert_eq!(
            Utc::from_unix_millis(951_825_600_500).rfc3339(),
            "2000-02-29T12:00:00.500Z"
        );
        // 2024-12-31T23:59:59.999Z
        assert_eq!(
            Utc::from_unix_millis(1_735_689_599_999).rfc3339(),
            "2024-12-31T23:59:59.999Z"
        );
        // 2100-03-01 (2100 is not a leap year)
        assert_eq!(
            Utc::from_unix_millis(4_107_542_400_000).rfc3339(),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            Utc::from_unix_millis(1_709_296_496_000).rfc3164(),
            "Mar  1 12:34:56"
        );
    }

    #[test]
    fn every_day_follows_the_previous() {
        let mut last = civil_from_days(-1);
        for day in 0..200_000 {
            let next = civil_from_days(day);
            let (y, m, d) = last;
            let expected_next_day = (y, m, d + 1);
            let expected_next_month = if m == 12 {
                (y + 1, 1, 1)
            } else {
                (y, m + 1, 1)
            };
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if d < month_len {
                expected_next_day
            } else {
                expected_next_month
            };
            assert_eq!(next, expected, "after {last:?}");
            last = next;
        }
    }

    #[test]
    fn the_user_has_a_name() {
        let (uid, name) = user();
        if uid == 0 {
            assert_eq!(name.as_deref(), Some("root"));
        }
        assert!(!hostname().is_empty());
    }
}
