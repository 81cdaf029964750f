//! `decide` from fixtures: the job of `tests/fixtures/bij-gpu.yaml` (3 shards, at most 1 failed
//! shard allowed) against Jobs in the states a cluster shows.

use super::*;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn bij() -> BatchInferenceJob {
    serde_yaml::from_str(&fixture("bij-gpu.yaml")).unwrap()
}

fn plan() -> PlanSummary {
    serde_json::from_str::<sluice_api::plan::ShardPlan>(&fixture("plan-3.json")).unwrap().summary()
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// The job's Indexed Job as the API server returns it.
fn job(parallelism: i32, suspend: bool, completed: &str, failed: &str) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": "eval-run-42", "namespace": "research" },
        "spec": { "completions": 3, "parallelism": parallelism, "suspend": suspend, "completionMode": "Indexed", "template": {} },
        "status": { "completedIndexes": completed, "failedIndexes": failed, "active": 0 }
    }))
    .unwrap()
}

struct Case {
    bij: BatchInferenceJob,
    old: BatchInferenceJobStatus,
    plan: PlanSummary,
    obs: Observation,
}

impl Case {
    fn new(job: Option<Job>) -> Self {
        Case { bij: bij(), old: BatchInferenceJobStatus::default(), plan: plan(), obs: Observation { job, ..Default::default() } }
    }

    fn facts(&self) -> Facts<'_> {
        Facts {
            bij: &self.bij,
            old: &self.old,
            plan: &self.plan,
            created: t("2026-12-01T00:00:00Z"),
            deadline: t("2026-12-01T08:00:00Z"),
            now: t("2026-12-01T01:00:00Z"),
            fleet_cap: None,
            prior_rps: None,
        }
    }

    fn decide_with(&self, finalized: Option<&Finalized>) -> (Progress, Decision) {
        let facts = self.facts();
        let progress = assess(&facts, &self.obs);
        let decision = decide(&facts, &self.obs, &progress, finalized, &WorkerDefaults::default()).unwrap();
        (progress, decision)
    }

    fn decide(&self) -> (Progress, Decision) {
        self.decide_with(None)
    }
}

fn reasons(notes: &[Note]) -> Vec<&str> {
    notes.iter().map(|n| n.reason.as_str()).collect()
}

#[test]
fn a_new_job_gets_its_indexed_job_created_at_the_scalers_parallelism() {
    let (_, d) = Case::new(None).decide();
    assert_eq!(d.phase, JobPhase::Running);
    assert!((1..=3).contains(&d.desired), "between workers.min and the shard count: {}", d.desired);
    assert_eq!(i64::from(d.desired), i64::from(d.step.parallelism));
    let JobChange::Create { job, notes } = &d.job else { panic!("expected a Job to create, got {:?}", d.job) };
    let spec = job.spec.as_ref().unwrap();
    assert_eq!((spec.parallelism, spec.completions), (Some(d.desired), Some(3)));
    assert_eq!(reasons(notes), ["JobCreated"]);
    assert!(notes[0].note.contains("created Job eval-run-42: 3 shards"), "{}", notes[0].note);
    assert_eq!(d.spec_note, None, "a first reconcile is not a spec edit");
    assert_eq!(d.failure, None);
}

#[test]
fn every_shard_committed_succeeds_and_leaves_the_job_alone() {
    let (p, d) = Case::new(Some(job(2, false, "0-2", ""))).decide();
    assert_eq!(p.completed, BTreeSet::from([0, 1, 2]));
    assert!(p.all_done);
    assert_eq!(d.phase, JobPhase::Succeeded);
    assert!(matches!(d.job, JobChange::Keep), "{:?}", d.job);
    assert!(!reasons(&d.notes).contains(&"Failed"));
}

#[test]
fn indexes_outside_the_plan_are_ignored() {
    let (p, _) = Case::new(Some(job(2, false, "1,7-9", "12"))).decide();
    assert_eq!(p.completed, BTreeSet::from([1]));
    assert!(p.failed.is_empty());
    assert!(!p.all_done);
}

#[test]
fn one_failed_shard_within_the_limit_still_completes() {
    let (p, d) = Case::new(Some(job(2, false, "0,2", "1"))).decide();
    assert_eq!(p.failed, BTreeSet::from([1]));
    assert!(!p.too_many_failed && p.all_done);
    assert_eq!(d.phase, JobPhase::Succeeded);
}

#[test]
fn more_failed_shards_than_allowed_fail_the_job_once_with_the_limit_named() {
    let mut case = Case::new(Some(job(2, false, "2", "0,1")));
    let (p, d) = case.decide();
    assert!(p.too_many_failed && !p.all_done);
    assert_eq!(d.phase, JobPhase::Failed);
    let failure = d.failure.clone().unwrap();
    assert!(failure.contains("2 shards failed after 2 retries each (shards 0,1)"), "{failure}");
    assert!(failure.contains("retries.maxFailedShards=1"), "{failure}");
    assert!(matches!(d.job, JobChange::Keep), "a failed job's Job is left as it is: {:?}", d.job);
    assert!(d.notes.iter().any(|n| n.reason == "Failed" && n.type_ == EventType::Warning && n.note == failure));

    // The next reconcile (already Failed) does not announce it again.
    case.old.phase = JobPhase::Failed;
    let (_, again) = case.decide();
    assert!(!reasons(&again.notes).contains(&"Failed"));
}

#[test]
fn suspending_a_running_job_patches_suspend_and_says_so() {
    let mut case = Case::new(Some(job(2, false, "", "")));
    case.bij.spec.suspend = true;
    let (_, d) = case.decide();
    assert_eq!(d.phase, JobPhase::Suspended);
    let JobChange::Patch { patch, notes, .. } = &d.job else { panic!("expected a patch, got {:?}", d.job) };
    assert_eq!(patch["spec"]["suspend"], true);
    assert!(reasons(notes).contains(&"Suspended"), "{notes:?}");

    // Under Kueue (the fixture's queueName), resuming is Kueue's: the patch leaves suspend alone.
    let mut case = Case::new(Some(job(2, true, "", "")));
    case.bij.spec.suspend = false;
    let (_, d) = case.decide();
    if let JobChange::Patch { patch, notes, .. } = &d.job {
        assert!(patch["spec"].get("suspend").is_none(), "Kueue admits the Job, not the operator: {patch}");
        assert!(!reasons(notes).contains(&"Resumed"), "{notes:?}");
    }

    // Without a queue, resuming patches it back, at the decided parallelism.
    case.bij.spec.queue_name = None;
    let (_, d) = case.decide();
    assert_eq!(d.phase, JobPhase::Running);
    let JobChange::Patch { patch, notes, .. } = &d.job else { panic!("expected a patch, got {:?}", d.job) };
    assert_eq!(patch["spec"]["suspend"], false);
    let resumed = notes.iter().find(|n| n.reason == "Resumed").unwrap();
    assert_eq!(resumed.note, format!("resumed at parallelism {}", d.desired));
}

#[test]
fn a_scaling_decision_is_annotated_and_announced_with_its_reason() {
    // A Job at parallelism 4 with no progress and 8 h left: the scaler moves it.
    let case = Case::new(Some(job(4, false, "", "")));
    let (_, d) = case.decide();
    match &d.job {
        JobChange::Patch { patch, scaled: Some((from, to)), notes } => {
            assert_eq!((*from, *to), (4, d.desired));
            assert_eq!(patch["spec"]["parallelism"], d.desired);
            if d.step.scaled {
                assert_eq!(patch["metadata"]["annotations"][LAST_SCALE_ANNOTATION], "2026-12-01T01:00:00Z");
                let scaled = notes.iter().find(|n| n.reason == "Scaled").unwrap();
                assert!(scaled.note.starts_with(&format!("scaled 4→{}: ", d.desired)), "{}", scaled.note);
            } else {
                assert!(patch.get("metadata").is_none(), "a change that follows the shards left is not recorded");
            }
        }
        JobChange::Keep => assert_eq!(d.desired, 4),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_spec_edit_is_announced_until_the_job_is_finished() {
    let mut case = Case::new(Some(job(1, false, "", "")));
    case.old.observed_generation = Some(2);
    let (_, d) = case.decide();
    let note = d.spec_note.unwrap();
    assert_eq!(note.reason, "SpecUpdated");
    assert!(note.note.starts_with("applied spec generation 3: workers 1..4"), "{}", note.note);

    let mut done = Case::new(Some(job(1, false, "0-2", "")));
    done.old.observed_generation = Some(2);
    assert_eq!(done.decide().1.spec_note, None);
}

#[test]
fn a_pending_finalize_keeps_the_job_running_and_a_failed_one_fails_it() {
    let case = Case::new(Some(job(1, false, "0-2", "")));
    let (_, d) = case.decide_with(Some(&Finalized::Pending));
    assert_eq!((d.phase, d.finalizing), (JobPhase::Running, true));

    let (_, d) = case.decide_with(Some(&Finalized::Failed("the finalize pod could not write the manifest".into())));
    assert_eq!(d.phase, JobPhase::Failed);
    assert_eq!(d.failure.as_deref(), Some("the finalize pod could not write the manifest"));

    let done = Finalized::Done { uri: "s3://evals/run-42/out/manifest.json".into(), counts: None };
    assert_eq!(case.decide_with(Some(&done)).1.phase, JobPhase::Succeeded);
}

#[test]
fn the_stall_clock_starts_without_progress_and_moves_only_when_work_is_done() {
    let case = Case::new(Some(job(1, false, "", "")));
    let (p, _) = case.decide();
    let mut cache = JobCache::default();
    note_progress(&mut cache, &p, t("2026-12-01T01:00:00Z"));
    assert_eq!((cache.last_done, cache.last_progress_at), (0, Some(t("2026-12-01T01:00:00Z"))));
    note_progress(&mut cache, &p, t("2026-12-01T02:00:00Z"));
    assert_eq!(cache.last_progress_at, Some(t("2026-12-01T01:00:00Z")), "no new work: the clock stays");
}

fn pod(phase: &str) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "eval-run-42-0-abc"}, "status": {"phase": phase}})).unwrap()
}

#[test]
fn a_cancel_stops_the_workers_then_the_close_steps_manifest_ends_it_cancelled() {
    let mut case = Case::new(Some(job(2, false, "0", "")));
    case.bij.spec.cancel = true;
    case.bij.spec.queue_name = None;
    let (p, d) = case.decide();
    assert_eq!(closing(&case.facts(), &p), Some(CloseReason::Cancelled));
    assert_eq!((d.phase, d.closing), (JobPhase::Running, Some(CloseReason::Cancelled)));
    assert_eq!(d.desired, 0, "a closing job wants no workers");
    let JobChange::Patch { patch, scaled: None, .. } = &d.job else { panic!("expected a stop patch, got {:?}", d.job) };
    assert_eq!(patch, &json!({"spec": {"parallelism": 0, "suspend": true}}));
    let note = d.notes.iter().find(|n| n.reason == "Cancelling").unwrap();
    assert!(note.note.contains("batch_cancelled"), "{}", note.note);

    // Announced once: the next reconcile (closeReason recorded) is quiet, and a stopped Job is
    // left alone.
    case.old.close_reason = Some(CloseReason::Cancelled);
    case.obs.job = Some(job(0, true, "0", ""));
    let (_, d) = case.decide_with(Some(&Finalized::Pending));
    assert!(matches!(d.job, JobChange::Keep), "{:?}", d.job);
    assert!(!reasons(&d.notes).contains(&"Cancelling"));
    assert_eq!(d.phase, JobPhase::Running);

    // The close step committed every shard: still the close's outcome, not a success.
    case.obs.job = Some(job(0, true, "0-2", ""));
    let (p, d) = case.decide_with(Some(&Finalized::Done { uri: "s3://b/out/manifest.json".into(), counts: None }));
    assert!(p.all_done);
    assert_eq!(d.phase, JobPhase::Cancelled);
    assert!(matches!(d.job, JobChange::Keep));

    // A close pod that failed fails the job with its message.
    let (_, d) = case.decide_with(Some(&Finalized::Failed("the close pod could not …".into())));
    assert_eq!(d.phase, JobPhase::Failed);
    assert_eq!(d.failure.as_deref(), Some("the close pod could not …"));
}

#[test]
fn under_kueue_a_close_scales_to_zero_and_leaves_suspend_to_kueue() {
    let mut case = Case::new(Some(job(2, false, "", "")));
    case.bij.spec.cancel = true;
    let (_, d) = case.decide();
    let JobChange::Patch { patch, .. } = &d.job else { panic!("{:?}", d.job) };
    assert_eq!(patch, &json!({"spec": {"parallelism": 0}}));
}

#[test]
fn a_job_that_is_done_or_failed_is_not_closed_by_a_late_cancel() {
    let mut case = Case::new(Some(job(2, false, "0-2", "")));
    case.bij.spec.cancel = true;
    let (p, d) = case.decide();
    assert_eq!(closing(&case.facts(), &p), None);
    assert_eq!(d.phase, JobPhase::Succeeded);
}

#[test]
fn expire_closes_at_the_deadline_and_continue_runs_on() {
    use sluice_api::job::OnDeadline;
    let mut case = Case::new(Some(job(2, false, "", "")));
    let mut facts = case.facts();
    let late = t("2026-12-01T08:00:00Z");
    facts.now = late;
    let p = assess(&facts, &case.obs);
    assert_eq!(closing(&facts, &p), None, "Continue is the default");
    case.bij.spec.sla.on_deadline = OnDeadline::Expire;
    let mut facts = case.facts();
    assert_eq!(closing(&facts, &p), None, "before the deadline nothing expires");
    facts.now = late;
    assert_eq!(closing(&facts, &p), Some(CloseReason::Expired));
    let d = decide(&facts, &case.obs, &p, None, &WorkerDefaults::default()).unwrap();
    let note = d.notes.iter().find(|n| n.reason == "Expiring").unwrap();
    assert_eq!(note.type_, EventType::Warning);
    assert!(note.note.contains("batch_expired") && note.note.contains("2026-12-01T08:00:00Z"), "{}", note.note);
    let d = decide(&facts, &case.obs, &p, Some(&Finalized::Done { uri: "u".into(), counts: None }), &WorkerDefaults::default()).unwrap();
    assert_eq!(d.phase, JobPhase::Expired);
}

#[test]
fn the_close_step_waits_until_no_worker_runs() {
    let mut obs = Observation { job: Some(job(2, false, "", "")), ..Default::default() };
    assert!(!workers_stopped(&obs), "a Job still at parallelism 2");
    obs.job = Some(job(0, true, "", ""));
    obs.pods = vec![pod("Running")];
    assert!(!workers_stopped(&obs), "a pod still terminating");
    obs.pods = vec![pod("Failed"), pod("Succeeded")];
    assert!(workers_stopped(&obs));
    let mut active = job(0, true, "", "");
    active.status.as_mut().unwrap().active = Some(1);
    obs.job = Some(active);
    assert!(!workers_stopped(&obs));
    assert!(workers_stopped(&Observation::default()), "no Job at all: nothing runs");
}
