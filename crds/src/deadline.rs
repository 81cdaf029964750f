//! Deadline arithmetic shared by the operator and local mode: parsing `completionWindow`
//! durations (`24h`, `1h30m`, `90s`) and resolving the effective deadline of a job.

use jiff::{SignedDuration, Timestamp};

use crate::job::SlaSpec;

/// Parse a duration such as `24h`, `1h30m`, `90m`, `1.5h`, `2d`, `1d12h` or `500ms`. Days come
/// first and at most once (the CRD's pattern says the same), so the rest is a Go duration.
pub fn parse_duration(s: &str) -> Result<SignedDuration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("invalid duration {s:?}: expected a number at {rest:?}"));
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| format!("invalid duration {s:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        if unit == "d" && rest.len() + num_len != s.len() {
            return Err(format!("invalid duration {s:?}: days come first and once (e.g. 1d12h)"));
        }
        let secs = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" => return Err(format!("invalid duration {s:?}: missing unit (ms, s, m, h or d)")),
            u => return Err(format!("invalid duration {s:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
        };
        total += value * secs;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total <= 0.0 || total > 366.0 * 86400.0 {
        return Err(format!("invalid duration {s:?}: must be positive and at most 366d"));
    }
    Ok(SignedDuration::from_secs_f64(total))
}

/// The effective deadline and the window it closes: `sla.deadline`, or `created +
/// sla.completionWindow`. The window starts at `created`.
pub fn effective_deadline(sla: &SlaSpec, created: Timestamp) -> Result<Timestamp, String> {
    match (&sla.deadline, &sla.completion_window) {
        (Some(d), None) => d.parse::<Timestamp>().map_err(|e| format!("spec.sla.deadline {d:?} is not an RFC 3339 time: {e}")),
        (None, Some(w)) => {
            let dur = parse_duration(w).map_err(|e| format!("spec.sla.completionWindow: {e}"))?;
            created.checked_add(dur).map_err(|e| format!("spec.sla.completionWindow {w:?} overflows: {e}"))
        }
        (Some(_), Some(_)) => Err("spec.sla: set exactly one of deadline or completionWindow, not both".into()),
        (None, None) => Err("spec.sla: set one of deadline or completionWindow".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86400);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("1.5h").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 172800);
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(parse_duration("1d12h").unwrap().as_secs(), 129600);
        assert!(parse_duration("12h1d").unwrap_err().contains("days come first"));
        assert!(parse_duration("1d1d").unwrap_err().contains("days come first"));
    }

    #[test]
    fn resolves_deadline() {
        let created: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let sla = SlaSpec {
            deadline: None,
            completion_window: Some("2h".into()),
            margin: 0.1,
            policy: Default::default(),
            on_deadline: Default::default(),
        };
        assert_eq!(effective_deadline(&sla, created).unwrap().to_string(), "2026-01-01T02:00:00Z");
        let sla = SlaSpec {
            deadline: Some("2026-01-02T00:00:00Z".into()),
            completion_window: None,
            margin: 0.1,
            policy: Default::default(),
            on_deadline: Default::default(),
        };
        assert_eq!(effective_deadline(&sla, created).unwrap().to_string(), "2026-01-02T00:00:00Z");
        let bad = SlaSpec {
            deadline: Some("tomorrow".into()),
            completion_window: None,
            margin: 0.1,
            policy: Default::default(),
            on_deadline: Default::default(),
        };
        assert!(effective_deadline(&bad, created).unwrap_err().contains("spec.sla.deadline"));
    }
}
