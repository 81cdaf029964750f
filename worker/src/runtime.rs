//! One shard, start to finish: read the plan, resume from committed chunks, stream the shard's
//! lines into the engine, commit finished lines in chunks, publish progress, finalize the
//! shard's results and errors, and stop cleanly on request. Generic over [`Generator`].

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sluice_api::contract::{exit, layout};
use sluice_api::job::{InputFormat, SamplingSpec};
use sluice_api::output::{Completion, OutputLine, Usage};
use sluice_api::plan::{Shard, ShardPlan};
use sluice_api::storage::{Location, StorageError, StorageOptions, resolve};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::commit::{CommitError, ShardOutput, Tally};
use crate::engine::{EngineHandle, EngineStats, GenerationOutput, GenerationRequest, RequestError};
use crate::metrics::{Outcome, WorkerMetrics};
use crate::parse::{LineParser, Parsed, WorkItem};
use crate::progress::ProgressReporter;
use crate::report::ReportClient;
use crate::shard::{ChunkPolicy, Coverage, Flush};

/// What the runtime needs from an engine.
pub trait Generator: Send + Sync {
    /// Queue a request; the receiver resolves when it finishes.
    fn submit(&self, req: GenerationRequest) -> oneshot::Receiver<Result<GenerationOutput, RequestError>>;
    /// Current load.
    fn stats(&self) -> EngineStats;
    /// The model name written into outputs.
    fn model_name(&self) -> String;
}

impl Generator for EngineHandle {
    fn submit(&self, req: GenerationRequest) -> oneshot::Receiver<Result<GenerationOutput, RequestError>> {
        EngineHandle::submit(self, req)
    }
    fn stats(&self) -> EngineStats {
        EngineHandle::stats(self)
    }
    fn model_name(&self) -> String {
        self.info().name.clone()
    }
}

/// Everything a shard run needs besides the engine.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub shard: u32,
    /// `plan.json`; `None` = `<output>/_sluice/plan.json`.
    pub plan_uri: Option<String>,
    /// Input object; `None` = the plan's `inputUri`.
    pub input_uri: Option<String>,
    pub input_format: InputFormat,
    pub output_uri: String,
    /// Stable key for request ids (the job name, else the output URI).
    pub job_key: String,
    /// This attempt's name (pod name) for the progress record.
    pub attempt: String,
    pub sampling: SamplingSpec,
    /// Requests handed to the engine at once.
    pub max_in_flight: usize,
    pub chunk_lines: u64,
    /// Commit finished lines at least this often (at `align` boundaries).
    pub chunk_max_age: Duration,
    pub progress_interval: Duration,
    /// Time from a stop request to exit: in-flight requests get this minus a commit reserve.
    pub grace: Duration,
    pub max_line_bytes: usize,
    pub storage: StorageOptions,
    /// Fault injection for tests (every store access goes through it).
    pub faults: Option<FaultConfig>,
    /// Where progress records are also reported (jobs whose storage only their pods reach).
    pub report: Option<ReportClient>,
}

/// A shard run failure. [`RunError::exit_code`] tells the operator whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("plan {uri}: {reason}")]
    Plan { uri: String, reason: String },
    #[error("input {uri} changed since planning: {reason}")]
    InputChanged { uri: String, reason: String },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("commit: {0}")]
    Commit(#[from] CommitError),
    #[error("engine failed on line {line}: {source}")]
    Engine { line: u64, source: RequestError },
    #[error("internal: {0}")]
    Internal(String),
}

impl RunError {
    /// Whether retrying the shard cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            RunError::Plan { .. } | RunError::InputChanged { .. } => true,
            RunError::Storage(e) => e.is_permanent(),
            RunError::Commit(e) => e.is_permanent(),
            RunError::Engine { .. } | RunError::Internal(_) => false,
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        if self.is_permanent() { exit::PERMANENT } else { exit::RETRYABLE }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The shard's final files are written (by this attempt or an earlier one).
    Complete(Tally),
    /// Stopped on request; finished work is committed.
    Stopped,
}

impl RunOutcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::Complete(_) => exit::SUCCESS,
            RunOutcome::Stopped => exit::TERMINATED,
        }
    }
}

/// A shard located and its committed state loaded; the engine is not needed yet.
pub struct PreparedShard {
    cfg: RunConfig,
    shard: Shard,
    input: Location,
    output: ShardOutput,
    coverage: Coverage,
    progress: ProgressReporter,
}

/// The storage faults a test injects (`--inject-faults`): the fault-injecting store's settings.
#[cfg(feature = "fault-injection")]
pub use sluice_api::storage::testing::FaultConfig;

/// Built without the `fault-injection` feature (release and image builds) there is nothing to
/// inject: the type has no values, and asking for faults is an error naming the feature.
#[cfg(not(feature = "fault-injection"))]
#[derive(Clone, Debug, PartialEq)]
pub enum FaultConfig {}

#[cfg(not(feature = "fault-injection"))]
impl std::str::FromStr for FaultConfig {
    type Err = String;

    fn from_str(_: &str) -> Result<Self, String> {
        Err("this worker is built without the fault-injection feature (a test-only feature of sluice-worker)".into())
    }
}

fn with_faults(loc: Location, faults: &Option<FaultConfig>) -> Location {
    match faults {
        #[cfg(feature = "fault-injection")]
        Some(f) => {
            let store = std::sync::Arc::new(sluice_api::storage::testing::FaultyStore::new(loc.store.clone(), f.clone()));
            loc.with_store(store)
        }
        #[cfg(not(feature = "fault-injection"))]
        Some(f) => match *f {},
        None => loc,
    }
}

impl PreparedShard {
    /// Read the plan, check the input, and list committed chunks.
    pub async fn prepare(cfg: RunConfig) -> Result<Self, RunError> {
        let output = with_faults(resolve(&cfg.output_uri, &cfg.storage)?, &cfg.faults);
        let plan_loc = match &cfg.plan_uri {
            Some(u) => with_faults(resolve(u, &cfg.storage)?, &cfg.faults),
            None => output.join(layout::PLAN)?,
        };
        let plan_err = |reason: String| RunError::Plan { uri: plan_loc.uri.clone(), reason };
        let plan: ShardPlan =
            serde_json::from_slice(&plan_loc.get_bytes().await?).map_err(|e| plan_err(format!("not a valid plan: {e}")))?;
        plan.check().map_err(plan_err)?;
        let shard = plan
            .shard(cfg.shard)
            .cloned()
            .ok_or_else(|| plan_err(format!("has {} shards; there is no shard {}", plan.shards.len(), cfg.shard)))?;
        let input_uri = cfg.input_uri.clone().unwrap_or_else(|| plan.input_uri.clone());
        let input = with_faults(resolve(&input_uri, &cfg.storage)?, &cfg.faults);
        let meta = input.head().await?;
        if meta.size != plan.input_size {
            return Err(RunError::InputChanged {
                uri: input.uri.clone(),
                reason: format!("it has {} bytes, the plan {}", meta.size, plan.input_size),
            });
        }
        if let (Some(planned), Some(now)) = (&plan.input_etag, &meta.e_tag)
            && planned != now
        {
            return Err(RunError::InputChanged {
                uri: input.uri.clone(),
                reason: format!("ETag {now} differs from the planned {planned}"),
            });
        }
        let shard_out = ShardOutput::new(output.clone(), cfg.shard);
        let coverage = shard_out.load_coverage(shard.first_line..shard.end_line()).await?;
        let mut progress =
            ProgressReporter::new(output.join(&layout::progress(cfg.shard))?, cfg.shard, cfg.attempt.clone(), shard.line_count)
                .reporting_to(cfg.report.clone());
        progress.set_committed(shard_out.tally(&coverage).await?);
        tracing::info!(
            shard = cfg.shard,
            lines = shard.line_count,
            committed = coverage.lines_covered(),
            chunks = coverage.chunks().len(),
            "shard prepared"
        );
        Ok(Self { cfg, shard, input, output: shard_out, coverage, progress })
    }

    /// Lines still to process.
    pub fn remaining_lines(&self) -> u64 {
        self.shard.line_count - self.coverage.lines_covered()
    }

    /// Finish without an engine when nothing is left to generate: the shard is finalized
    /// already, or every line is committed and only the final files are missing.
    pub async fn finish_if_done(&mut self) -> Result<Option<RunOutcome>, RunError> {
        if self.output.is_finalized().await? {
            tracing::info!(shard = self.cfg.shard, "shard already finalized");
            self.coverage = self.output.load_coverage(self.coverage.range()).await?;
            let t = self.output.tally(&self.coverage).await?;
            self.progress.set_committed(t);
            self.progress.set_complete();
            self.progress.publish().await;
            return Ok(Some(RunOutcome::Complete(t)));
        }
        if self.coverage.complete() {
            return self.finalize().await.map(Some);
        }
        self.progress.publish().await;
        Ok(None)
    }

    async fn finalize(&mut self) -> Result<RunOutcome, RunError> {
        let f = self.output.finalize(&self.coverage).await?;
        tracing::info!(
            shard = self.cfg.shard,
            lines = f.tally.lines,
            succeeded = f.tally.succeeded,
            failed = f.tally.failed,
            wrote = f.wrote_results,
            "shard finalized"
        );
        self.progress.set_committed(f.tally);
        self.progress.set_complete();
        self.progress.publish().await;
        Ok(RunOutcome::Complete(f.tally))
    }

    /// Process the remaining lines with `engine`, until done or `stop` turns true.
    pub async fn run<G: Generator + ?Sized>(
        mut self,
        engine: &G,
        metrics: &WorkerMetrics,
        mut stop: watch::Receiver<bool>,
    ) -> Result<RunOutcome, RunError> {
        if let Some(done) = self.finish_if_done().await? {
            return Ok(done);
        }
        self.progress.set_ready();
        self.progress.publish().await;
        let model = engine.model_name();
        let policy = ChunkPolicy::new(self.cfg.chunk_lines);
        let max_in_flight = self.cfg.max_in_flight.max(1);
        let (tx, mut rx) = mpsc::channel(max_in_flight);
        let reader = tokio::spawn(read_lines(
            self.input.clone(),
            self.shard.clone(),
            self.coverage.clone(),
            LineParser::new(self.cfg.input_format, self.cfg.max_line_bytes, self.cfg.sampling.clone(), self.cfg.job_key.clone()),
            self.cfg.max_line_bytes,
            tx,
        ));
        let mut inflight = FuturesUnordered::new();
        let mut done: BTreeMap<u64, OutputLine> = BTreeMap::new();
        let (mut stopping, mut stop_closed, mut input_done) = (*stop.borrow(), false, false);
        // Keep a reserve of the grace period for the final commit.
        let drain = self.cfg.grace.saturating_sub(self.cfg.grace.min(Duration::from_secs(5)) / 2);
        let mut drain_deadline = Instant::now() + drain;
        let mut last_commit = Instant::now();
        let mut progress_tick = tokio::time::interval(self.cfg.progress_interval.max(Duration::from_millis(50)));
        let mut flush_tick = tokio::time::interval((self.cfg.chunk_max_age / 4).clamp(Duration::from_millis(20), Duration::from_secs(1)));
        let mut metrics_tick = tokio::time::interval(Duration::from_millis(500));
        let result: Result<(), RunError> = async {
            loop {
                if inflight.is_empty() && (input_done || stopping) {
                    return Ok(());
                }
                tokio::select! {
                    biased;
                    changed = stop.changed(), if !stopping && !stop_closed => match changed {
                        Ok(()) if *stop.borrow() => {
                            stopping = true;
                            drain_deadline = Instant::now() + drain;
                            tracing::info!(in_flight = inflight.len(), "stopping: waiting up to {drain:?} for requests in flight");
                        }
                        Ok(()) => {}
                        Err(_) => stop_closed = true,
                    },
                    _ = tokio::time::sleep_until(drain_deadline), if stopping => {
                        tracing::warn!(abandoned = inflight.len(), "grace period ending; abandoning unfinished requests");
                        return Ok(());
                    }
                    Some((item, res)) = inflight.next(), if !inflight.is_empty() => {
                        let item: WorkItem = item;
                        let out = finish(&self.cfg.job_key, &model, &item, res, metrics)?;
                        done.insert(item.line, out);
                    }
                    msg = rx.recv(), if !stopping && !input_done && inflight.len() < max_in_flight => match msg {
                        None => input_done = true,
                        Some(Err(e)) => return Err(e),
                        Some(Ok((line, Parsed::Error(out)))) => {
                            metrics.request_done(Outcome::failed, 0, 0, None);
                            done.insert(line, *out);
                        }
                        Some(Ok((line, Parsed::Request(item)))) => {
                            let rx = engine.submit(GenerationRequest { id: line, prompt: item.prompt.clone(), params: item.params.clone() });
                            inflight.push(async move { (*item, rx.await) });
                        }
                    },
                    _ = progress_tick.tick() => self.progress.publish().await,
                    _ = metrics_tick.tick() => metrics.engine_stats(&engine.stats()),
                    _ = flush_tick.tick() => {
                        if last_commit.elapsed() >= self.cfg.chunk_max_age {
                            self.commit(&mut done, policy, Flush::Aligned, metrics).await?;
                            last_commit = Instant::now();
                        }
                    }
                }
                if self.commit(&mut done, policy, Flush::Full, metrics).await? > 0 {
                    last_commit = Instant::now();
                }
            }
        }
        .await;
        reader.abort();
        // Whatever happened, keep what is finished.
        let committed = self.commit(&mut done, policy, Flush::All, metrics).await;
        metrics.engine_stats(&engine.stats());
        result?;
        committed?;
        if self.coverage.complete() {
            return self.finalize().await;
        }
        self.progress.publish().await;
        if stopping {
            return Ok(RunOutcome::Stopped);
        }
        Err(RunError::Internal(format!("input ended with lines {:?} uncovered", self.coverage.gaps())))
    }

    /// Commit the chunks `flush` allows; returns how many.
    async fn commit(
        &mut self,
        done: &mut BTreeMap<u64, OutputLine>,
        policy: ChunkPolicy,
        flush: Flush,
        metrics: &WorkerMetrics,
    ) -> Result<usize, RunError> {
        let cuts = self.coverage.cut(done, policy, flush);
        for c in &cuts {
            let outcome = self.output.commit_chunk(c, done).await?;
            let mut t = Tally::default();
            for line in c.clone() {
                if let Some(l) = done.remove(&line) {
                    t.add(&l);
                }
            }
            self.coverage.add(c.clone());
            self.progress.add_committed(t);
            metrics.chunk_committed();
            tracing::debug!(first = c.start, end = c.end, ?outcome, "chunk committed");
        }
        Ok(cuts.len())
    }
}

/// Turn an engine result into an output line; engine-wide failures abort the shard.
fn finish(
    job_key: &str,
    model: &str,
    item: &WorkItem,
    res: Result<Result<GenerationOutput, RequestError>, oneshot::error::RecvError>,
    metrics: &WorkerMetrics,
) -> Result<OutputLine, RunError> {
    let res = res.unwrap_or(Err(RequestError::Shutdown));
    match res {
        Ok(o) => {
            let usage = Usage::new(o.prompt_tokens as u64, o.completion_tokens as u64);
            let tpot = (o.completion_tokens > 1).then(|| o.total.saturating_sub(o.ttft).as_secs_f64() / (o.completion_tokens - 1) as f64);
            metrics.request_done(Outcome::succeeded, usage.prompt_tokens, usage.completion_tokens, tpot);
            let c = Completion {
                custom_id: &item.custom_id,
                line: item.line,
                chat: item.chat,
                model,
                text: &o.text,
                finish_reason: o.finish_reason.as_str(),
                usage,
                created: jiff::Timestamp::now().as_second(),
            };
            Ok(OutputLine::success(job_key, &c))
        }
        // The request's own fault: recorded as its error, the shard goes on.
        Err(
            e @ (RequestError::PromptTooLong { .. }
            | RequestError::EmptyPrompt
            | RequestError::Template(_)
            | RequestError::Tokenize(_)
            | RequestError::Invalid(_)),
        ) => {
            metrics.request_done(Outcome::failed, 0, 0, None);
            Ok(OutputLine::failure(job_key, Some(&item.custom_id), item.line, e.metric_label(), &format!("line {}: {e}", item.line)))
        }
        // Closed before it ran: recorded with the close's own code.
        Err(RequestError::Withdrawn(reason)) => {
            metrics.request_done(Outcome::failed, 0, 0, None);
            Ok(OutputLine::failure(job_key, Some(&item.custom_id), item.line, reason.code(), reason.message()))
        }
        // The engine's fault: retry the shard rather than record a failure.
        Err(source) => Err(RunError::Engine { line: item.line, source }),
    }
}

/// Stream the shard's byte range, parse every line (duplicates need all of them) and send the
/// uncommitted ones on.
async fn read_lines(
    input: Location,
    shard: Shard,
    coverage: Coverage,
    mut parser: LineParser,
    max_line_bytes: usize,
    tx: mpsc::Sender<Result<(u64, Parsed), RunError>>,
) {
    let result: Result<(), RunError> = async {
        let mut reader = input.lines(shard.start..shard.end, max_line_bytes).await?;
        let mut line = shard.first_line;
        while let Some(l) = reader.next_line().await? {
            if line >= shard.end_line() {
                return Err(RunError::InputChanged {
                    uri: input.uri.clone(),
                    reason: format!("bytes {}..{} hold more than the planned {} lines", shard.start, shard.end, shard.line_count),
                });
            }
            let parsed = parser.parse(&l.bytes, l.len, line);
            if !coverage.covers(line) && tx.send(Ok((line, parsed))).await.is_err() {
                return Ok(());
            }
            line += 1;
        }
        if line != shard.end_line() {
            return Err(RunError::InputChanged {
                uri: input.uri.clone(),
                reason: format!(
                    "bytes {}..{} hold {} lines, the plan {}",
                    shard.start,
                    shard.end,
                    line - shard.first_line,
                    shard.line_count
                ),
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
}

#[cfg(test)]
mod tests {
    //! The commit protocol against a deterministic fake engine (the binary's integration tests
    //! use the real engine and model).
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::engine::{FinishReason, Prompt};
    use sluice_api::plan::PLAN_VERSION;
    use sluice_api::storage::RetryPolicy;

    /// Echoes the prompt reversed; optionally stalls after `stall_after` requests.
    struct Fake {
        submitted: AtomicUsize,
        stall_after: usize,
    }

    impl Generator for Fake {
        fn submit(&self, req: GenerationRequest) -> oneshot::Receiver<Result<GenerationOutput, RequestError>> {
            let n = self.submitted.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = oneshot::channel();
            if n >= self.stall_after {
                std::mem::forget(tx);
                return rx;
            }
            let text = match &req.prompt {
                Prompt::Text(t) => t.chars().rev().collect(),
                Prompt::Chat(m) => m.iter().map(|m| m.content.clone()).collect(),
                Prompt::Tokens(_) => String::new(),
            };
            let res = if matches!(&req.prompt, Prompt::Text(t) if t == "TOOLONG") {
                Err(RequestError::PromptTooLong { len: 9, max: 8 })
            } else if matches!(&req.prompt, Prompt::Text(t) if t == "CRASH") {
                Err(RequestError::Engine("device lost".into()))
            } else {
                Ok(GenerationOutput {
                    id: req.id,
                    prompt_tokens: text.len(),
                    completion_tokens: 2,
                    text,
                    token_ids: vec![1, 2],
                    finish_reason: FinishReason::Length,
                    ttft: Duration::from_millis(1),
                    total: Duration::from_millis(3),
                })
            };
            let _ = tx.send(res);
            rx
        }
        fn stats(&self) -> EngineStats {
            EngineStats::default()
        }
        fn model_name(&self) -> String {
            "fake".into()
        }
    }

    fn setup(lines: &[String], per_shard: u64) -> (tempfile::TempDir, RunConfig) {
        let dir = tempfile::tempdir().unwrap();
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.path().join("in.jsonl"), &body).unwrap();
        let mut shards = Vec::new();
        let (mut start, mut first) = (0u64, 1u64);
        for (i, group) in lines.chunks(per_shard as usize).enumerate() {
            let len: u64 = group.iter().map(|l| l.len() as u64 + 1).sum();
            shards.push(Shard { index: i as u32, start, end: start + len, first_line: first, line_count: group.len() as u64 });
            start += len;
            first += group.len() as u64;
        }
        let input_uri = dir.path().join("in.jsonl").display().to_string();
        let plan = ShardPlan {
            version: PLAN_VERSION,
            input_uri,
            input_size: body.len() as u64,
            input_etag: None,
            line_count: lines.len() as u64,
            requests_per_shard: per_shard,
            shards,
        };
        std::fs::create_dir_all(dir.path().join("out/_sluice")).unwrap();
        std::fs::write(dir.path().join("out/_sluice/plan.json"), serde_json::to_vec(&plan).unwrap()).unwrap();
        let cfg = RunConfig {
            shard: 0,
            plan_uri: None,
            input_uri: None,
            input_format: InputFormat::Auto,
            output_uri: format!("file://{}/out", dir.path().display()),
            job_key: "test".into(),
            attempt: "a".into(),
            sampling: SamplingSpec::default(),
            max_in_flight: 4,
            chunk_lines: 4,
            chunk_max_age: Duration::from_secs(60),
            progress_interval: Duration::from_secs(60),
            grace: Duration::from_secs(2),
            max_line_bytes: 1000,
            storage: StorageOptions {
                retry: RetryPolicy {
                    max_retries: 10,
                    init_backoff: Duration::from_millis(1),
                    max_backoff: Duration::from_millis(4),
                    timeout: Duration::from_secs(20),
                },
                ..Default::default()
            },
            faults: None,
            report: None,
        };
        (dir, cfg)
    }

    fn prompts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!(r#"{{"id":"r{i}","prompt":"p{i}"}}"#)).collect()
    }

    fn read_out(dir: &std::path::Path, shard: u32) -> (Vec<OutputLine>, Vec<OutputLine>) {
        let read = |p: String| std::fs::read_to_string(dir.join(p)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (read(format!("out/{}", layout::results(shard))), read(format!("out/{}", layout::errors(shard))))
    }

    fn never_stop() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    #[tokio::test]
    async fn a_shard_completes_with_results_and_errors() {
        let mut lines = prompts(9);
        lines[3] = "{broken".into();
        lines[5] = r#"{"id":"r1","prompt":"dup"}"#.into();
        lines[7] = r#"{"id":"x","prompt":"TOOLONG"}"#.into();
        let (dir, cfg) = setup(&lines, 100);
        let fake = Fake { submitted: AtomicUsize::new(0), stall_after: usize::MAX };
        let out = PreparedShard::prepare(cfg).await.unwrap().run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap();
        let RunOutcome::Complete(t) = out else { panic!("{out:?}") };
        assert_eq!((t.lines, t.succeeded, t.failed), (9, 6, 3));
        let (results, errors) = read_out(dir.path(), 0);
        assert_eq!(results.iter().map(|l| l.custom_id.clone().unwrap()).collect::<Vec<_>>(), ["r0", "r1", "r2", "r4", "r6", "r8"]);
        assert_eq!(results[1].response.as_ref().unwrap().body["choices"][0]["text"], "1p");
        assert_eq!(errors.iter().map(|l| l.line.unwrap()).collect::<Vec<_>>(), [4, 6, 8]);
        assert_eq!(errors[1].error.as_ref().unwrap().code, "duplicate_custom_id");
        assert_eq!(errors[2].error.as_ref().unwrap().code, "prompt_too_long");
        let progress: sluice_api::progress::ShardProgress =
            serde_json::from_slice(&std::fs::read(dir.path().join("out").join(layout::progress(0))).unwrap()).unwrap();
        assert!(progress.complete && progress.lines_done == 9 && progress.ready_at.is_some());
    }

    #[tokio::test]
    async fn an_engine_failure_fails_the_attempt_retryably_and_keeps_finished_lines() {
        let mut lines = prompts(8);
        lines[6] = r#"{"id":"boom","prompt":"CRASH"}"#.into();
        let (dir, cfg) = setup(&lines, 100);
        let fake = Fake { submitted: AtomicUsize::new(0), stall_after: usize::MAX };
        let cfg = RunConfig { max_in_flight: 1, ..cfg };
        let e = PreparedShard::prepare(cfg).await.unwrap().run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap_err();
        assert_eq!(e.exit_code(), exit::RETRYABLE);
        assert!(e.to_string().contains("line 7") && e.to_string().contains("device lost"), "{e}");
        let chunks: Vec<_> =
            std::fs::read_dir(dir.path().join("out/_sluice/shards/00000")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(chunks.len(), 2, "lines 1..7 are committed: {chunks:?}");
        assert!(!dir.path().join("out").join(layout::results(0)).exists());
    }

    #[tokio::test]
    async fn stop_commits_finished_lines_and_a_rerun_completes_exactly_once() {
        let lines = prompts(10);
        let (dir, cfg) = setup(&lines, 100);
        let stalled = Fake { submitted: AtomicUsize::new(0), stall_after: 6 };
        let (tx, rx) = watch::channel(false);
        let prepared = PreparedShard::prepare(cfg.clone()).await.unwrap();
        let run = tokio::spawn(async move { prepared.run(&stalled, &WorkerMetrics::new(), rx).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).unwrap();
        assert_eq!(run.await.unwrap().unwrap(), RunOutcome::Stopped);
        let chunks = std::fs::read_dir(dir.path().join("out/_sluice/shards/00000")).unwrap().count();
        assert!(chunks >= 2, "lines 1..7 are committed in {chunks} chunks");
        let fake = Fake { submitted: AtomicUsize::new(0), stall_after: usize::MAX };
        let prepared = PreparedShard::prepare(cfg.clone()).await.unwrap();
        assert_eq!(prepared.remaining_lines(), 4);
        let RunOutcome::Complete(t) = prepared.run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap() else { panic!() };
        assert_eq!(t.lines, 10);
        assert_eq!(fake.submitted.load(Ordering::SeqCst), 4, "only the uncommitted lines ran again");
        let (results, errors) = read_out(dir.path(), 0);
        assert!(errors.is_empty());
        assert_eq!(results.iter().map(|l| l.line.unwrap()).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
        // A third attempt finds the shard finalized and needs no engine work.
        let again = PreparedShard::prepare(cfg).await.unwrap().run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap();
        assert!(matches!(again, RunOutcome::Complete(t) if t.lines == 10));
        assert_eq!(fake.submitted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn concurrent_attempts_with_different_chunk_sizes_give_exactly_once() {
        let lines = prompts(37);
        let (dir, cfg) = setup(&lines, 100);
        let mut handles = Vec::new();
        for (i, chunk) in [3u64, 5, 8].into_iter().enumerate() {
            let cfg = RunConfig { chunk_lines: chunk, max_in_flight: 1 + i, attempt: format!("a{i}"), ..cfg.clone() };
            handles.push(tokio::spawn(async move {
                let fake = Fake { submitted: AtomicUsize::new(0), stall_after: usize::MAX };
                PreparedShard::prepare(cfg).await.unwrap().run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap()
            }));
        }
        for h in handles {
            let out = h.await.unwrap();
            assert!(matches!(out, RunOutcome::Complete(t) if t.lines == 37), "{out:?}");
        }
        let (results, _) = read_out(dir.path(), 0);
        assert_eq!(results.iter().map(|l| l.line.unwrap()).collect::<Vec<_>>(), (1..=37).collect::<Vec<_>>());
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn asking_a_build_without_fault_injection_for_faults_is_an_error() {
        let err = "error_rate=1".parse::<FaultConfig>().unwrap_err();
        assert!(err.contains("fault-injection feature"), "{err}");
    }

    #[cfg(feature = "fault-injection")]
    #[tokio::test]
    async fn transient_faults_are_survived_and_permanent_ones_fail_clearly() {
        let lines = prompts(12);
        let (dir, cfg) = setup(&lines, 6);
        let faulty =
            RunConfig { shard: 1, faults: Some("error_rate=0.3,delay_rate=0.3,delay_ms=2,seed=11".parse().unwrap()), ..cfg.clone() };
        let fake = Fake { submitted: AtomicUsize::new(0), stall_after: usize::MAX };
        let out = PreparedShard::prepare(faulty).await.unwrap().run(&fake, &WorkerMetrics::new(), never_stop()).await.unwrap();
        assert!(matches!(out, RunOutcome::Complete(t) if t.lines == 6));
        assert_eq!(read_out(dir.path(), 1).0.len(), 6);

        let denied = RunConfig { faults: Some("error_rate=1,permanent=true".parse().unwrap()), ..cfg.clone() };
        let e = PreparedShard::prepare(denied).await.err().unwrap();
        assert_eq!(e.exit_code(), exit::PERMANENT);
        assert!(e.to_string().contains("denied") && e.to_string().contains("plan.json"), "{e}");

        let missing = RunConfig { shard: 5, ..cfg.clone() };
        let e = PreparedShard::prepare(missing).await.err().unwrap();
        assert_eq!(e.exit_code(), exit::PERMANENT);
        assert!(e.to_string().contains("no shard 5"), "{e}");

        std::fs::write(dir.path().join("in.jsonl"), "changed\n").unwrap();
        let e = PreparedShard::prepare(cfg).await.err().unwrap();
        assert!(matches!(e, RunError::InputChanged { .. }) && e.exit_code() == exit::PERMANENT, "{e}");
    }
}
