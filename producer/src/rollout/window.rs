//! The maintenance window: devices are started only inside it; jobs already
//! running finish whenever they finish.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days on which the window opens (in its own time zone).
    days: Vec<Weekday>,
    start: NaiveTime,
    /// May be earlier than `start`: the window then ends the next day.
    end: NaiveTime,
    zone: Tz,
}

impl Window {
    /// `days` like `["mon", "fri"]`, times like `"22:00"`, a zone like
    /// `"Europe/Paris"`.
    pub fn parse(days: &[String], start: &str, end: &str, zone: &str) -> Result<Window, String> {
        let days = days
            .iter()
            .map(|d| {
                d.parse::<Weekday>()
                    .map_err(|_| format!("window.days: {d:?} is not a day (mon, tue, ... sun)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if days.is_empty() {
            return Err("window.days is empty".to_owned());
        }
        let time = |name: &str, text: &str| {
            NaiveTime::parse_from_str(text, "%H:%M")
                .map_err(|_| format!("window.{name}: {text:?} is not a time like \"22:30\""))
        };
        let start = time("start", start)?;
        let end = time("end", end)?;
        if start == end {
            return Err("window.start and window.end are equal".to_owned());
        }
        let zone = zone.parse::<Tz>().map_err(|_| {
            format!("window.time_zone: {zone:?} is not a time zone like \"Europe/Paris\"")
        })?;
        Ok(Window {
            days,
            start,
            end,
            zone,
        })
    }

    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.zone);
        let time = local.time();
        if self.start < self.end {
            self.days.contains(&local.weekday()) && time >= self.start && time < self.end
        } else if time >= self.start {
            // Spans midnight: the evening part belongs to today's window...
            self.days.contains(&local.weekday())
        } else if time < self.end {
            // ...and the morning part to yesterday's.
            self.days.contains(&local.weekday().pred())
        } else {
            false
        }
    }

    /// When the window next opens (now, if it is open).
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        if self.is_open(now) {
            return now;
        }
        let today = now.with_timezone(&self.zone).date_naive();
        (0..=7)
            .filter_map(|days_ahead| {
                let day = today + Duration::days(days_ahead);
                if !self.days.contains(&day.weekday()) {
                    return None;
                }
                // A start time skipped by a daylight-saving jump opens at
                // the first instant after it.
                self.zone
                    .from_local_datetime(&day.and_time(self.start))
                    .earliest()
                    .map(|t| t.with_timezone(&Utc))
            })
            .find(|opens| *opens > now)
            .unwrap_or(now + Duration::days(7))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn a_night_window_spans_midnight_in_its_own_time_zone() {
        // Mon-Fri 22:00-05:00 in Paris (UTC+1 in November).
        let window = Window::parse(
            &["mon", "tue", "wed", "thu", "fri"].map(String::from),
            "22:00",
            "05:00",
            "Europe/Paris",
        )
        .unwrap();
        // Monday 2026-11-23, 21:30 UTC = 22:30 Paris: open.
        assert!(window.is_open(at("2026-11-23T21:30:00Z")));
        // Tuesday 03:00 UTC = 04:00 Paris, morning of Monday's window: open.
        assert!(window.is_open(at("2026-11-24T03:00:00Z")));
        // Tuesday 12:00 UTC: closed; opens Tuesday 22:00 Paris = 21:00 UTC.
        assert!(!window.is_open(at("2026-11-24T12:00:00Z")));
        assert_eq!(
            window.next_open(at("2026-11-24T12:00:00Z")),
            at("2026-11-24T21:00:00Z")
        );
        // Saturday 03:00 Paris belongs to Friday's window: open. Sunday
        // 03:00 Paris belongs to Saturday's, which does not exist: closed.
        assert!(window.is_open(at("2026-11-28T02:00:00Z")));
        assert!(!window.is_open(at("2026-11-29T02:00:00Z")));
        // From Saturday noon the next opening is Monday 22:00 Paris.
        assert_eq!(
            window.next_open(at("2026-11-28T12:00:00Z")),
            at("2026-11-30T21:00:00Z")
        );
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        let days = ["mon".to_owned()];
        assert!(
            Window::parse(&days, "25:00", "05:00", "UTC")
                .unwrap_err()
                .contains("window.start")
        );
        assert!(
            Window::parse(&days, "01:00", "05:00", "Mars/Olympus")
                .unwrap_err()
                .contains("time_zone")
        );
        assert!(
            Window::parse(&["someday".to_owned()], "01:00", "05:00", "UTC")
                .unwrap_err()
                .contains("someday")
        );
    }
}
