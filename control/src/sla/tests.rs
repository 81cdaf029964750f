//! Table tests of the SLA core: on track, at risk, breached, infeasible, hysteresis, no
//! observations yet, Fastest, finished, the shard cap, and the throughput estimator.

use super::*;

const H: f64 = 3600.0;

fn t(secs: f64) -> Timestamp {
    add_secs(Timestamp::from_second(1_800_000_000).unwrap(), secs).unwrap()
}

fn cfg(min: u32, max: u32) -> SlaConfig {
    let mut c = SlaConfig::new(min, max, SlaPolicy::Deadline, 0.1, 0.5);
    c.prior_startup_secs = 60.0;
    c
}

/// 100 shards of 1000 requests, 24 h window, 1 h in, 10 % done, 1 req/s per worker measured.
fn obs() -> SlaObservation {
    SlaObservation {
        now: t(H),
        window_start: t(0.0),
        deadline: t(24.0 * H),
        total_requests: 100_000,
        done_requests: 10_000,
        per_worker_rate: Some(RateEstimate { mean: 1.0, stddev: 0.1, samples: 100 }),
        startup_secs: Some(60.0),
        active_workers: 2,
        current_desired: 2,
        total_shards: 100,
        remaining_shards: 90,
        unschedulable_workers: 0,
        last_scale_change: Some(t(0.0)),
        previous_status: Some(SlaStatus::OnTrack),
        finished: false,
    }
}

fn with_rate(mut o: SlaObservation, mean: f64) -> SlaObservation {
    o.per_worker_rate = Some(RateEstimate { mean, stddev: 0.1 * mean, samples: 100 });
    o
}

#[test]
fn table() {
    struct Case {
        name: &'static str,
        cfg: SlaConfig,
        obs: SlaObservation,
        desired: u32,
        status: SlaStatus,
    }
    let cases = vec![
        Case { name: "on track at the current count", cfg: cfg(0, 10), obs: obs(), desired: 2, status: SlaStatus::OnTrack },
        Case { name: "behind: scales up at once", cfg: cfg(0, 10), obs: with_rate(obs(), 0.5), desired: 3, status: SlaStatus::OnTrack },
        Case {
            name: "at risk: max reached, pessimistic plan misses the target, mean makes the deadline",
            cfg: cfg(0, 2),
            obs: with_rate(obs(), 0.62),
            desired: 2,
            status: SlaStatus::AtRisk,
        },
        Case {
            name: "infeasible: even max misses the deadline",
            cfg: cfg(0, 2),
            obs: with_rate(obs(), 0.3),
            desired: 2,
            status: SlaStatus::Infeasible,
        },
        Case {
            name: "breached: deadline passed with work left",
            cfg: cfg(0, 10),
            obs: SlaObservation { now: t(25.0 * H), ..obs() },
            desired: 10,
            status: SlaStatus::Breached,
        },
        Case {
            name: "min workers respected",
            cfg: cfg(4, 10),
            obs: SlaObservation { current_desired: 4, active_workers: 4, ..obs() },
            desired: 4,
            status: SlaStatus::OnTrack,
        },
        Case {
            name: "Fastest runs max",
            cfg: SlaConfig { policy: SlaPolicy::Fastest, ..cfg(0, 10) },
            obs: obs(),
            desired: 10,
            status: SlaStatus::OnTrack,
        },
        Case {
            name: "Fastest never exceeds the shards left",
            cfg: SlaConfig { policy: SlaPolicy::Fastest, ..cfg(0, 10) },
            obs: SlaObservation { remaining_shards: 3, done_requests: 97_000, ..obs() },
            desired: 3,
            status: SlaStatus::OnTrack,
        },
        Case {
            name: "never more workers than shards left",
            cfg: cfg(0, 50),
            obs: SlaObservation {
                now: t(23.0 * H),
                done_requests: 96_000,
                remaining_shards: 4,
                active_workers: 2,
                ..with_rate(obs(), 0.05)
            },
            desired: 4,
            status: SlaStatus::Infeasible,
        },
        Case {
            name: "finished early: Met, no workers",
            cfg: cfg(1, 10),
            obs: SlaObservation { finished: true, done_requests: 100_000, remaining_shards: 0, now: t(20.0 * H), ..obs() },
            desired: 0,
            status: SlaStatus::Met,
        },
        Case {
            name: "finished late: Missed",
            cfg: cfg(1, 10),
            obs: SlaObservation { finished: true, done_requests: 100_000, remaining_shards: 0, now: t(24.5 * H), ..obs() },
            desired: 0,
            status: SlaStatus::Missed,
        },
    ];
    for c in cases {
        let d = decide(&c.cfg, &c.obs);
        assert_eq!((d.desired_workers, d.status), (c.desired, c.status), "{}: {d:?}", c.name);
        assert!(!d.reason.is_empty(), "{}", c.name);
    }
}

#[test]
fn scale_up_projects_and_explains() {
    let d = decide(&cfg(0, 10), &with_rate(obs(), 0.5));
    assert!(d.desired_workers > 2);
    assert!(d.reason.contains("at 2 workers against 24h0m deadline"), "{}", d.reason);
    let p = d.projected_completion.unwrap();
    assert!(p <= t(21.6 * H), "projected {p} after the target");
    assert!(d.slack_secs.unwrap() > 2.4 * H - 1.0);
    assert!(!d.shard_capped && !d.using_prior);
}

#[test]
fn infeasible_says_by_how_much_and_what_fixes_it() {
    let d = decide(&cfg(0, 2), &with_rate(obs(), 0.3));
    let inf = d.infeasible.expect("infeasible");
    // 90k requests at 0.6 req/s plus start-ups: about 42 h after the 1 h mark.
    assert!(inf.late_by_secs > 17.0 * H && inf.late_by_secs < 21.0 * H, "{inf:?}");
    let n = inf.workers_needed.expect("some count makes it");
    assert!((4..=5).contains(&n), "{n}");
    assert!(inf.feasible_deadline > inf.projected_at_max);
    assert!(inf.suggestion.contains("raise workers.max to at least"), "{}", inf.suggestion);
    assert!(inf.suggestion.contains("move the deadline to"), "{}", inf.suggestion);
    assert!(d.reason.starts_with("infeasible: workers.max is 2"), "{}", d.reason);
}

#[test]
fn infeasible_with_no_worker_count_that_helps() {
    // One shard left that takes longer than the time to the deadline.
    let o = SlaObservation {
        now: t(23.5 * H),
        done_requests: 99_000,
        remaining_shards: 1,
        active_workers: 1,
        current_desired: 1,
        ..with_rate(obs(), 0.1)
    };
    let d = decide(&cfg(0, 10), &o);
    let inf = d.infeasible.expect("infeasible");
    assert_eq!(inf.workers_needed, None);
    assert!(!inf.suggestion.contains("raise workers.max"), "{}", inf.suggestion);
}

#[test]
fn capacity_cap_counts_only_schedulable_pods() {
    // 10 wanted, 8 unschedulable: the projection uses 2 and flags the job.
    let o = SlaObservation { current_desired: 10, active_workers: 2, unschedulable_workers: 8, ..with_rate(obs(), 0.3) };
    let d = decide(&cfg(0, 10), &o);
    assert_eq!(d.status, SlaStatus::Infeasible);
    assert!(d.desired_workers >= 5, "keeps asking for what it needs: {d:?}");
    assert!(d.infeasible.unwrap().suggestion.starts_with("only 2 workers could be scheduled"));
}

#[test]
fn no_observations_use_the_prior_then_the_measurement() {
    let mut o = SlaObservation {
        now: t(0.0),
        done_requests: 0,
        remaining_shards: 100,
        active_workers: 0,
        current_desired: 0,
        per_worker_rate: None,
        startup_secs: None,
        last_scale_change: None,
        previous_status: None,
        ..obs()
    };
    let d = decide(&cfg(0, 20), &o);
    assert!(d.using_prior);
    assert!(d.reason.contains("assumed (prior"), "{}", d.reason);
    // 100k requests at 0.5 req/s within 21.6 h: 3 workers (2 would need 27.8 h).
    assert_eq!(d.desired_workers, 3, "{d:?}");
    assert_eq!(d.status, SlaStatus::OnTrack);
    // First progress says 0.25 req/s: scale up at once.
    o.current_desired = 3;
    o.active_workers = 3;
    o.per_worker_rate = Some(RateEstimate { mean: 0.25, stddev: 0.0, samples: 1 });
    o.last_scale_change = Some(t(0.0));
    let d2 = decide(&cfg(0, 20), &o);
    assert!(!d2.using_prior);
    assert!(d2.desired_workers >= 6, "{d2:?}");
}

#[test]
fn the_prior_alone_never_makes_a_job_infeasible() {
    let o = SlaObservation {
        now: t(0.0),
        done_requests: 0,
        remaining_shards: 100,
        active_workers: 0,
        current_desired: 0,
        per_worker_rate: None,
        startup_secs: None,
        last_scale_change: None,
        previous_status: None,
        ..obs()
    };
    let d = decide(&cfg(0, 1), &o);
    // At admission the prior says it is late even at workers.max: AtRisk, saying it is a prior,
    // and no advice to move the deadline.
    assert_eq!(d.status, SlaStatus::AtRisk, "{d:?}");
    assert!(d.infeasible.is_none());
    assert!(d.reason.contains("assumed (prior: nothing measured yet"), "{}", d.reason);
    assert!(!d.reason.contains("move the deadline"), "{}", d.reason);
    // The first measurement decides.
    let measured = SlaObservation { per_worker_rate: Some(RateEstimate { mean: 0.5, stddev: 0.05, samples: 10 }), ..o };
    let d = decide(&cfg(0, 1), &SlaObservation { previous_status: Some(SlaStatus::AtRisk), ..measured.clone() });
    assert_eq!(d.status, SlaStatus::Infeasible);
    let fast = SlaObservation { per_worker_rate: Some(RateEstimate { mean: 1e6, stddev: 1.0, samples: 10 }), ..measured };
    let d = decide(&cfg(0, 1), &SlaObservation { previous_status: Some(SlaStatus::AtRisk), ..fast });
    assert_eq!(d.status, SlaStatus::OnTrack, "{d:?}");
}

#[test]
fn after_admission_the_prior_alone_only_makes_a_job_at_risk() {
    let o = SlaObservation {
        now: t(600.0),
        done_requests: 0,
        remaining_shards: 100,
        active_workers: 1,
        current_desired: 1,
        per_worker_rate: None,
        startup_secs: None,
        last_scale_change: Some(t(0.0)),
        previous_status: Some(SlaStatus::OnTrack),
        ..obs()
    };
    let d = decide(&cfg(0, 1), &o);
    assert_eq!(d.status, SlaStatus::AtRisk, "{d:?}");
    assert!(d.infeasible.is_none());
    // Even after an earlier Infeasible, the prior alone does not keep it so.
    let d = decide(&cfg(0, 1), &SlaObservation { previous_status: Some(SlaStatus::Infeasible), ..o.clone() });
    assert_eq!(d.status, SlaStatus::AtRisk);
    // Measured throughput confirms it.
    let d = decide(&cfg(0, 1), &SlaObservation { per_worker_rate: Some(RateEstimate { mean: 0.5, stddev: 0.05, samples: 10 }), ..o });
    assert_eq!(d.status, SlaStatus::Infeasible);
}

#[test]
fn scale_down_waits_for_cooldown_and_a_clear_lead() {
    let c = cfg(0, 20);
    // 10 running, only about 2 needed.
    let base = SlaObservation { current_desired: 10, active_workers: 10, ..obs() };
    let recent = SlaObservation { last_scale_change: Some(t(H - 120.0)), ..base.clone() };
    assert_eq!(decide(&c, &recent).desired_workers, 10, "within the 5 min cooldown");
    let cooled = SlaObservation { last_scale_change: Some(t(H - 301.0)), ..base.clone() };
    let d = decide(&c, &cooled);
    assert!(d.desired_workers < 10 && d.desired_workers >= 2, "{d:?}");
    assert!(!d.shard_capped);
    // Only slightly ahead: 3 running where the plan needs about 3 at the target but the
    // down-headroom asks for 3 too: no change.
    let slow = SlaObservation { current_desired: 3, active_workers: 3, ..with_rate(base, 0.5) };
    assert_eq!(decide(&c, &slow).desired_workers, 3);
}

#[test]
fn status_deadband() {
    let c = SlaConfig { status_deadband: 0.02, ..cfg(0, 2) };
    // Find a rate just around the target at 2 workers.
    let over = |mean: f64| {
        let o = with_rate(obs(), mean);
        let w = Work::from_obs(&o, 60.0);
        let r = o.per_worker_rate.unwrap();
        w.makespan(2, r.mean - r.stddev / 10.0) - (23.0 * H - 0.1 * 24.0 * H)
    };
    let (mut lo, mut hi) = (0.3, 2.0);
    for _ in 0..60 {
        let m = 0.5 * (lo + hi);
        if over(m) > 0.0 { lo = m } else { hi = m }
    }
    let slightly_late = 0.995 * hi; // just over the target, well inside the band
    let slightly_early = 1.005 * hi;
    assert!(over(slightly_late) > 0.0 && over(slightly_early) < 0.0);
    let prev = |s, m| decide(&c, &SlaObservation { previous_status: Some(s), ..with_rate(obs(), m) }).status;
    assert_eq!(prev(SlaStatus::OnTrack, slightly_late), SlaStatus::OnTrack);
    assert_eq!(prev(SlaStatus::AtRisk, slightly_early), SlaStatus::AtRisk);
    assert_eq!(prev(SlaStatus::AtRisk, 1.2 * hi), SlaStatus::OnTrack);
    assert_eq!(prev(SlaStatus::OnTrack, 0.9 * hi), SlaStatus::AtRisk);
}

#[test]
fn spec_edits_take_effect_at_once() {
    // max lowered below the current count: drop without waiting for the cooldown.
    let o = SlaObservation { current_desired: 8, active_workers: 8, last_scale_change: Some(t(H - 10.0)), ..obs() };
    assert_eq!(decide(&cfg(0, 5), &o).desired_workers, 5);
}

#[test]
fn shard_cap_is_not_a_scaling_decision() {
    let o = SlaObservation {
        current_desired: 6,
        active_workers: 4,
        remaining_shards: 4,
        done_requests: 96_000,
        last_scale_change: Some(t(H - 10.0)),
        ..with_rate(obs(), 0.05)
    };
    let d = decide(&cfg(0, 10), &o);
    assert_eq!(d.desired_workers, 4);
    assert!(d.shard_capped, "{d:?}");
}

#[test]
fn makespan_counts_waves_and_running_shards() {
    let w = Work { in_flight_requests: 0.0, active: 0.0, unstarted: 8.0, shard_requests: 100.0, startup: 0.0 };
    assert!((w.makespan(8, 1.0) - 100.0).abs() < 1e-6);
    assert!((w.makespan(5, 1.0) - 200.0).abs() < 1e-6);
    assert!((w.makespan(4, 1.0) - 200.0).abs() < 1e-6);
    assert!((w.makespan(3, 1.0) - 300.0).abs() < 1e-6);
    let running = Work { in_flight_requests: 100.0, active: 2.0, unstarted: 2.0, shard_requests: 100.0, startup: 10.0 };
    // 2 slots free at 50 s take the 2 fresh shards: 50 + 110.
    assert!((running.makespan(2, 1.0) - 160.0).abs() < 1e-6);
    // 4 slots: 2 fresh shards start now.
    assert!((running.makespan(4, 1.0) - 110.0).abs() < 1e-6);
    // Fewer slots than running shards: running ones still finish.
    assert!((running.makespan(1, 1.0) - 270.0).abs() < 1e-6);
    assert_eq!(running.makespan(0, 1.0), f64::INFINITY);
    assert_eq!(running.makespan(2, 0.0), f64::INFINITY);
}

#[test]
fn from_spec_reads_bounds_policy_margin_and_prior() {
    let spec: BatchInferenceJobSpec = serde_json::from_value(serde_json::json!({
        "model": {"uri": "file:///m"},
        "input": {"uri": "file:///in.jsonl"},
        "output": {"uri": "file:///out/"},
        "sampling": {"maxTokens": 500},
        "sla": {"completionWindow": "24h", "margin": 0.2, "policy": "Fastest"},
        "workers": {"min": 1, "max": 8, "gpus": 2}
    }))
    .unwrap();
    let c = SlaConfig::from_spec(&spec);
    assert_eq!((c.min_workers, c.max_workers, c.policy), (1, 8, SlaPolicy::Fastest));
    assert!((c.margin - 0.2).abs() < 1e-12);
    assert!((c.prior_per_worker_rps - 4.0).abs() < 1e-12);
    assert_eq!(c.prior_startup_secs, PRIOR_STARTUP_SECS);
}

#[test]
fn estimator_converges_ignores_garbage_and_forgets() {
    let mut e = ThroughputEstimator::new();
    assert_eq!(e.estimate(), None);
    e.observe(f64::NAN, 10.0);
    e.observe(2.0, 0.0);
    e.observe(-1.0, 10.0);
    assert_eq!(e.estimate(), None);
    for i in 0..200 {
        e.observe(if i % 2 == 0 { 9.0 } else { 11.0 }, 15.0);
    }
    let r = e.estimate().unwrap();
    assert!((r.mean - 10.0).abs() < 0.1, "{r:?}");
    assert!((r.stddev - 1.0).abs() < 0.05, "{r:?}");
    assert!(r.samples > 100, "{r:?}");
    // The rate halves: after a few half-lives the estimate follows.
    for _ in 0..3000 {
        e.observe(5.0, 15.0);
    }
    assert!((e.estimate().unwrap().mean - 5.0).abs() < 0.1);
    assert_eq!(e.startup_secs(), None);
    e.observe_startup(100.0);
    e.observe_startup(200.0);
    assert!((e.startup_secs().unwrap() - 150.0).abs() < 1e-9, "plain mean at first");
    e.observe_startup(f64::INFINITY);
    assert!((e.startup_secs().unwrap() - 150.0).abs() < 1e-9);
    for _ in 0..100 {
        e.observe_startup(60.0);
    }
    assert!((e.startup_secs().unwrap() - 60.0).abs() < 0.01, "then follows the recent ones");
}

#[test]
fn formats_durations() {
    assert_eq!(fmt_secs(26.0 * H), "26h0m");
    assert_eq!(fmt_secs(90.0), "1m30s");
    assert_eq!(fmt_secs(120.0), "2m");
    assert_eq!(fmt_secs(-30.0), "-30s");
    assert_eq!(fmt_secs(3.0 * 86400.0 + 7200.0), "3d2h");
    assert_eq!(fmt_secs(f64::INFINITY), "∞");
}
