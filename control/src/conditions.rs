//! Kubernetes-style conditions on the BatchInferenceJob status: set one by type, keeping its
//! `lastTransitionTime` when the status (True/False) does not change, and stamping
//! `observedGeneration`. Pure; the clock is a parameter.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// One condition to set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond<'a> {
    pub type_: &'a str,
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    pub message: String,
}

impl<'a> Cond<'a> {
    pub fn new(type_: &'a str, status: bool, reason: &'a str, message: impl Into<String>) -> Self {
        Self { type_, status, reason, message: message.into() }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Set `cond` in `conditions` (replacing the one of the same type). `lastTransitionTime` is
/// `now` only when the condition is new or its status flips.
pub fn set(conditions: &mut Vec<Condition>, cond: Cond<'_>, generation: Option<i64>, now: Timestamp) {
    let status = status_str(cond.status);
    let transition = match conditions.iter().find(|c| c.type_ == cond.type_) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    };
    let new = Condition {
        type_: cond.type_.to_string(),
        status: status.to_string(),
        reason: cond.reason.to_string(),
        message: cond.message,
        observed_generation: generation,
        last_transition_time: transition,
    };
    match conditions.iter_mut().find(|c| c.type_ == cond.type_) {
        Some(slot) => *slot = new,
        None => conditions.push(new),
    }
}

/// Remove the condition of this type, if any.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// The condition of this type, if any.
pub fn get<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of this type is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let mut cs = Vec::new();
        set(&mut cs, Cond::new("OnTrack", true, "OnTrack", "fine"), Some(1), t("2026-01-01T00:00:00Z"));
        set(&mut cs, Cond::new("OnTrack", true, "OnTrack", "still fine"), Some(2), t("2026-01-01T01:00:00Z"));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].last_transition_time.0, t("2026-01-01T00:00:00Z"));
        assert_eq!((cs[0].message.as_str(), cs[0].observed_generation), ("still fine", Some(2)));
        set(&mut cs, Cond::new("OnTrack", false, "AtRisk", "late"), Some(2), t("2026-01-01T02:00:00Z"));
        assert_eq!(cs[0].last_transition_time.0, t("2026-01-01T02:00:00Z"));
        assert_eq!((cs[0].status.as_str(), cs[0].reason.as_str()), ("False", "AtRisk"));
        assert!(!is_true(&cs, "OnTrack"));
        set(&mut cs, Cond::new("Complete", true, "AllShardsCommitted", ""), None, t("2026-01-01T03:00:00Z"));
        assert!(is_true(&cs, "Complete"));
        remove(&mut cs, "Complete");
        assert!(get(&cs, "Complete").is_none());
    }
}
