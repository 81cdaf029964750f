//! The planner: one streaming GET pass over the input object that counts lines and cuts it into
//! line-aligned byte ranges (shards), in constant memory, and the write-once `plan.json` that
//! makes planning idempotent across operator restarts. Pure over `ObjectStore`; no Kubernetes.
//! The operator runs it when it can reach the job's storage; otherwise the job's own planner pod
//! (`sluice-worker plan`) does.
//!
//! Shard size: `spec.sharding.requestsPerShard` lines when set. Otherwise ("auto") shards are
//! cut by bytes: `input size / (4 × workers.max)`, clamped to [16 MiB, 256 MiB], so every worker
//! gets about four shards (the last wave is short, so the job balances), a shard is big enough
//! that its model load (tens of seconds) is a small share of its run (≥ 16 MiB is ~10k
//! requests, many minutes of generation), and small enough that a lost pod costs little.
//! Inputs under 16 MiB get one shard. No plan exceeds [`MAX_SHARDS`] (the Indexed Job limit).

use object_store::ObjectMeta;

use crate::contract::layout;
use crate::jobio::{self, JobIoError as Error, Result};
use crate::plan::{PLAN_VERSION, Shard, ShardPlan};
use crate::storage::{Location, PutOutcome, StorageError};

/// Most shards in a plan: the Kubernetes limit on completions of an Indexed Job with
/// `backoffLimitPerIndex`.
pub const MAX_SHARDS: u64 = 100_000;
/// Smallest automatic shard.
pub const AUTO_MIN_SHARD_BYTES: u64 = 16 * 1024 * 1024;
/// Largest automatic shard.
pub const AUTO_MAX_SHARD_BYTES: u64 = 256 * 1024 * 1024;
/// Automatic shards aim for this many shards per concurrent worker.
pub const AUTO_SHARDS_PER_WORKER: u64 = 4;

/// Where a shard ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSize {
    /// After this many lines.
    Lines(u64),
    /// At the first line end at or after this many bytes.
    Bytes(u64),
}

/// The shard size for a job (see the module docs for the automatic rule).
pub fn shard_size(requests_per_shard: Option<u32>, input_size: u64, max_workers: i32) -> ShardSize {
    match requests_per_shard {
        Some(n) => ShardSize::Lines(u64::from(n.max(1))),
        None => {
            let shards = AUTO_SHARDS_PER_WORKER * u64::try_from(max_workers.max(1)).unwrap_or(1);
            ShardSize::Bytes(input_size.div_ceil(shards).clamp(AUTO_MIN_SHARD_BYTES, AUTO_MAX_SHARD_BYTES))
        }
    }
}

/// The streaming core: feed the input's bytes in any chunking, then `finish`. Holds no input
/// bytes between calls, only counters and the shard list.
#[derive(Debug)]
pub struct Splitter {
    size: ShardSize,
    max_shards: u64,
    pos: u64,
    lines: u64,
    shard_start: u64,
    shard_first_line: u64,
    shard_lines: u64,
    last_byte_newline: bool,
    shards: Vec<Shard>,
}

impl Splitter {
    pub fn new(size: ShardSize, max_shards: u64) -> Self {
        Self {
            size,
            max_shards,
            pos: 0,
            lines: 0,
            shard_start: 0,
            shard_first_line: 1,
            shard_lines: 0,
            last_byte_newline: true,
            shards: Vec::new(),
        }
    }

    fn cut(&mut self, end: u64) -> Result<(), u64> {
        if self.shards.len() as u64 >= self.max_shards {
            return Err(self.max_shards);
        }
        let index = u32::try_from(self.shards.len()).map_err(|_| self.max_shards)?;
        self.shards.push(Shard { index, start: self.shard_start, end, first_line: self.shard_first_line, line_count: self.shard_lines });
        self.shard_start = end;
        self.shard_first_line += self.shard_lines;
        self.shard_lines = 0;
        Ok(())
    }

    /// Consume the next chunk. Fails (with the limit) once the plan would exceed `max_shards`.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), u64> {
        let base = self.pos;
        for i in memchr::memchr_iter(b'\n', chunk) {
            let end = base + i as u64 + 1;
            self.lines += 1;
            self.shard_lines += 1;
            let full = match self.size {
                ShardSize::Lines(n) => self.shard_lines >= n,
                ShardSize::Bytes(b) => end - self.shard_start >= b,
            };
            if full {
                self.cut(end)?;
            }
        }
        if let Some(last) = chunk.last() {
            self.last_byte_newline = *last == b'\n';
        }
        self.pos += chunk.len() as u64;
        Ok(())
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Close the last shard (a final line without newline counts) and return `(lines, shards)`.
    pub fn finish(mut self) -> Result<(u64, Vec<Shard>), u64> {
        if !self.last_byte_newline {
            self.lines += 1;
            self.shard_lines += 1;
        }
        if self.pos > self.shard_start {
            self.cut(self.pos)?;
        }
        Ok((self.lines, self.shards))
    }
}

/// The input's metadata; a missing input is [`Error::InputNotFound`].
async fn input_meta(input: &Location) -> Result<ObjectMeta> {
    match input.head().await {
        Ok(m) => Ok(m),
        Err(StorageError::NotFound { .. }) => Err(Error::InputNotFound { uri: input.uri.clone() }),
        Err(e) => Err(e.into()),
    }
}

/// Stream the input once (resuming a broken stream from the last byte received) and build its
/// plan.
pub async fn plan_input(input: &Location, requests_per_shard: Option<u32>, max_workers: i32) -> Result<ShardPlan> {
    let meta = input_meta(input).await?;
    let size = shard_size(requests_per_shard, meta.size, max_workers);
    let mut splitter = Splitter::new(size, MAX_SHARDS);
    let too_many = |limit: u64| Error::TooManyShards {
        uri: input.uri.clone(),
        limit,
        requests_per_shard: match size {
            ShardSize::Lines(n) => n,
            ShardSize::Bytes(_) => 0,
        },
    };
    let changed = |current: String| Error::InputChanged {
        uri: input.uri.clone(),
        plan_uri: String::new(),
        planned: format!("{} bytes announced", meta.size),
        current,
    };
    let mut reader = match input.range_reader(0..meta.size).await {
        Ok(r) => r,
        Err(StorageError::NotFound { .. }) => return Err(Error::InputNotFound { uri: input.uri.clone() }),
        Err(StorageError::ShortObject { size, .. }) => return Err(changed(format!("{size} bytes"))),
        Err(e) => return Err(e.into()),
    };
    loop {
        let chunk = match reader.next_chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(StorageError::ShortObject { size, .. }) => return Err(changed(format!("{size} bytes"))),
            Err(e) => return Err(e.into()),
        };
        splitter.feed(&chunk).map_err(too_many)?;
    }
    let read = splitter.position();
    if read != meta.size {
        return Err(changed(format!("{read} bytes read")));
    }
    let (line_count, shards) = splitter.finish().map_err(too_many)?;
    let requests_per_shard = match size {
        ShardSize::Lines(n) => n,
        ShardSize::Bytes(_) => line_count.div_ceil(shards.len().max(1) as u64),
    };
    Ok(ShardPlan {
        version: PLAN_VERSION,
        input_uri: input.uri.clone(),
        input_size: meta.size,
        input_etag: meta.e_tag.clone(),
        line_count,
        requests_per_shard,
        shards,
    })
}

/// What `load_or_create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanOutcome {
    pub plan: ShardPlan,
    /// `true` when this call planned and wrote the plan; `false` when an existing plan was reused.
    pub created: bool,
}

fn describe(size: u64, etag: Option<&str>) -> String {
    match etag {
        Some(e) => format!("{size} bytes, etag {e}"),
        None => format!("{size} bytes"),
    }
}

/// Check that a stored plan still describes the input.
pub fn check_plan_matches(plan: &ShardPlan, plan_uri: &str, input_uri: &str, meta: &ObjectMeta) -> Result<()> {
    plan.check().map_err(|reason| Error::BadDocument { uri: plan_uri.to_string(), what: "shard plan", reason })?;
    let etag_differs = matches!((&plan.input_etag, &meta.e_tag), (Some(a), Some(b)) if a != b);
    if plan.input_uri != input_uri || plan.input_size != meta.size || etag_differs {
        return Err(Error::InputChanged {
            uri: input_uri.to_string(),
            plan_uri: plan_uri.to_string(),
            planned: format!("{} ({})", plan.input_uri, describe(plan.input_size, plan.input_etag.as_deref())),
            current: format!("{input_uri} ({})", describe(meta.size, meta.e_tag.as_deref())),
        });
    }
    Ok(())
}

/// Reuse `<output>/_sluice/plan.json` when it exists and still matches the input; otherwise plan
/// the input and write the plan once (create-only, so two planners cannot both win).
/// `requests_per_shard` and `max_workers` are the job's `sharding.requestsPerShard` and
/// `workers.max`.
pub async fn load_or_create(requests_per_shard: Option<u32>, max_workers: i32, input: &Location, output: &Location) -> Result<PlanOutcome> {
    let plan_loc = output.child(layout::PLAN);
    if let Some(plan) = jobio::read_json::<ShardPlan>(&plan_loc, "shard plan").await? {
        let meta = input_meta(input).await?;
        check_plan_matches(&plan, &plan_loc.uri, &input.uri, &meta)?;
        return Ok(PlanOutcome { plan, created: false });
    }
    let plan = plan_input(input, requests_per_shard, max_workers).await?;
    match jobio::put_json_create(&plan_loc, &plan, "shard plan").await? {
        PutOutcome::Created => Ok(PlanOutcome { plan, created: true }),
        PutOutcome::AlreadyExists => {
            // Another planner won the race: use its plan (it read the same input).
            let stored = jobio::read_json::<ShardPlan>(&plan_loc, "shard plan").await?.ok_or_else(|| Error::BadDocument {
                uri: plan_loc.uri.clone(),
                what: "shard plan",
                reason: "vanished after a create conflict".into(),
            })?;
            Ok(PlanOutcome { plan: stored, created: false })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::ops::Range;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use futures::StreamExt;
    use futures::stream::{self, BoxStream};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectStore, ObjectStoreExt,
        PutMultipartOptions, PutOptions, PutPayload, PutResult,
    };

    use super::*;
    use crate::storage::RetryPolicy;

    fn mem(store: &Arc<dyn ObjectStore>, uri: &str) -> Location {
        let raw = uri.split_once("://").map_or(uri, |(_, rest)| rest);
        Location::new(store.clone(), Path::from(raw), uri, RetryPolicy::default())
    }

    fn split(input: &[u8], size: ShardSize, chunk: usize) -> (u64, Vec<Shard>) {
        let mut s = Splitter::new(size, MAX_SHARDS);
        for c in input.chunks(chunk.max(1)) {
            s.feed(c).unwrap();
        }
        s.finish().unwrap()
    }

    fn ranges(shards: &[Shard]) -> Vec<(u64, u64, u64, u64)> {
        shards.iter().map(|s| (s.start, s.end, s.first_line, s.line_count)).collect()
    }

    #[test]
    fn shards_are_line_aligned_whatever_the_chunking() {
        let input = b"a\nbb\nccc\ndddd\neeeee\n";
        for chunk in 1..input.len() + 1 {
            let (lines, shards) = split(input, ShardSize::Lines(2), chunk);
            assert_eq!(lines, 5);
            assert_eq!(ranges(&shards), vec![(0, 5, 1, 2), (5, 14, 3, 2), (14, 20, 5, 1)], "chunk {chunk}");
        }
    }

    #[test]
    fn final_line_without_newline_counts() {
        let (lines, shards) = split(b"a\nbb\nccc", ShardSize::Lines(2), 3);
        assert_eq!(lines, 3);
        assert_eq!(ranges(&shards), vec![(0, 5, 1, 2), (5, 8, 3, 1)]);
        let (lines, shards) = split(b"only", ShardSize::Lines(10), 2);
        assert_eq!((lines, ranges(&shards)), (1, vec![(0, 4, 1, 1)]));
    }

    #[test]
    fn empty_input_has_no_shards_and_empty_lines_count() {
        assert_eq!(split(b"", ShardSize::Lines(3), 4), (0, vec![]));
        let (lines, shards) = split(b"\n\nx\n", ShardSize::Lines(10), 1);
        assert_eq!((lines, ranges(&shards)), (3, vec![(0, 4, 1, 3)]));
    }

    #[test]
    fn byte_shards_cut_at_the_first_line_end_past_the_target() {
        let (lines, shards) = split(b"aaaa\nbb\ncccccc\nd\n", ShardSize::Bytes(6), 5);
        assert_eq!(lines, 4);
        assert_eq!(ranges(&shards), vec![(0, 8, 1, 2), (8, 15, 3, 1), (15, 17, 4, 1)]);
    }

    #[test]
    fn too_many_shards_is_reported_early() {
        let mut s = Splitter::new(ShardSize::Lines(1), 2);
        assert_eq!(s.feed(b"a\nb\nc\n"), Err(2));
    }

    #[test]
    fn auto_rule() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(shard_size(Some(500), 1 << 40, 8), ShardSize::Lines(500));
        assert_eq!(shard_size(None, 10 * MIB, 8), ShardSize::Bytes(AUTO_MIN_SHARD_BYTES));
        assert_eq!(shard_size(None, 8 * 4 * 64 * MIB, 8), ShardSize::Bytes(64 * MIB));
        assert_eq!(shard_size(None, 1 << 40, 2), ShardSize::Bytes(AUTO_MAX_SHARD_BYTES));
        assert_eq!(shard_size(None, 0, 0), ShardSize::Bytes(AUTO_MIN_SHARD_BYTES));
    }

    async fn locations(input: &'static [u8]) -> (Location, Location) {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let input_loc = mem(&store, "mem://in.jsonl");
        input_loc.store.put(&input_loc.path, PutPayload::from_static(input)).await.unwrap();
        (input_loc, mem(&store, "mem://out"))
    }

    #[tokio::test]
    async fn plan_is_written_once_and_reused() {
        let (input, output) = locations(b"{\"id\":1}\n{\"id\":2}\n{\"id\":3}").await;
        let first = load_or_create(Some(2), 1, &input, &output).await.unwrap();
        assert!(first.created);
        assert_eq!(first.plan.line_count, 3);
        assert_eq!(first.plan.shards.len(), 2);
        first.plan.check().unwrap();
        let stored: ShardPlan = jobio::read_json(&output.child(layout::PLAN), "plan").await.unwrap().unwrap();
        assert_eq!(stored, first.plan);
        // A restart (even with a different shard size in the spec) reuses the stored plan.
        let again = load_or_create(Some(1), 1, &input, &output).await.unwrap();
        assert_eq!(again, PlanOutcome { plan: first.plan, created: false });
    }

    #[tokio::test]
    async fn changed_input_is_detected() {
        let (input, output) = locations(b"a\nb\n").await;
        load_or_create(None, 1, &input, &output).await.unwrap();
        input.store.put(&input.path, PutPayload::from_static(b"a\nb\nc\n")).await.unwrap();
        let err = load_or_create(None, 1, &input, &output).await.unwrap_err();
        assert!(matches!(err, Error::InputChanged { .. }), "{err}");
        assert!(err.to_string().contains("changed after planning"));
    }

    #[tokio::test]
    async fn missing_input_is_an_error_naming_it() {
        let (_, output) = locations(b"").await;
        let missing = output.child("nope.jsonl");
        let err = load_or_create(None, 1, &missing, &output).await.unwrap_err();
        assert!(matches!(err, Error::InputNotFound { .. }));
        assert!(err.to_string().contains("mem://out/nope.jsonl"), "{err}");
    }

    #[tokio::test]
    async fn empty_input_plans_zero_shards() {
        let (input, output) = locations(b"").await;
        let out = load_or_create(None, 1, &input, &output).await.unwrap();
        assert_eq!((out.plan.line_count, out.plan.shards.len(), out.plan.input_size), (0, 0, 0));
        out.plan.check().unwrap();
    }

    /// An object of `total` bytes of identical 1 KiB lines, produced lazily in 8 MiB chunks that
    /// all share one buffer. Tracks how many chunk bytes are alive at once.
    #[derive(Debug)]
    struct Generated {
        total: u64,
        chunk: Arc<Vec<u8>>,
        live: Arc<AtomicU64>,
        peak: Arc<AtomicU64>,
    }

    struct Tracked {
        buf: Arc<Vec<u8>>,
        live: Arc<AtomicU64>,
    }
    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.buf
        }
    }
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.live.fetch_sub(self.buf.len() as u64, Ordering::SeqCst);
        }
    }

    impl fmt::Display for Generated {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Generated({} bytes)", self.total)
        }
    }

    fn unsupported() -> object_store::Error {
        object_store::Error::NotImplemented { operation: "write".into(), implementer: "Generated".into() }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Generated {
        async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> object_store::Result<PutResult> {
            Err(unsupported())
        }
        async fn put_multipart_opts(&self, _: &Path, _: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
            Err(unsupported())
        }
        async fn get_opts(&self, location: &Path, _: GetOptions) -> object_store::Result<GetResult> {
            let n = self.total / self.chunk.len() as u64;
            let (chunk, live, peak) = (self.chunk.clone(), self.live.clone(), self.peak.clone());
            let s = stream::iter(0..n).map(move |_| {
                let now = live.fetch_add(chunk.len() as u64, Ordering::SeqCst) + chunk.len() as u64;
                peak.fetch_max(now, Ordering::SeqCst);
                Ok(Bytes::from_owner(Tracked { buf: chunk.clone(), live: live.clone() }))
            });
            Ok(GetResult {
                payload: GetResultPayload::Stream(s.boxed()),
                meta: ObjectMeta {
                    location: location.clone(),
                    last_modified: Default::default(),
                    size: self.total,
                    e_tag: Some("gen-1".into()),
                    version: None,
                },
                range: Range { start: 0, end: self.total },
                attributes: Default::default(),
                extensions: Default::default(),
            })
        }
        fn delete_stream(&self, _: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
            stream::once(async { Err(unsupported()) }).boxed()
        }
        fn list(&self, _: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            stream::once(async { Err(unsupported()) }).boxed()
        }
        async fn list_with_delimiter(&self, _: Option<&Path>) -> object_store::Result<ListResult> {
            Err(unsupported())
        }
        async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
            Err(unsupported())
        }
    }

    #[tokio::test]
    async fn a_multi_gigabyte_input_streams_in_constant_memory() {
        const CHUNK: usize = 8 * 1024 * 1024;
        const LINE: usize = 1024;
        let mut line = vec![b'x'; LINE];
        line[LINE - 1] = b'\n';
        let chunk: Vec<u8> = line.iter().copied().cycle().take(CHUNK).collect();
        let total: u64 = 4 * 1024 * 1024 * 1024; // 4 GiB, 4 Mi lines
        let live = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let store = Generated { total, chunk: Arc::new(chunk), live: live.clone(), peak: peak.clone() };
        let input = Location::new(Arc::new(store), Path::from("big.jsonl"), "gen://big.jsonl", RetryPolicy::default());

        let plan = plan_input(&input, None, 4).await.unwrap();
        plan.check().unwrap();
        assert_eq!(plan.input_size, total);
        assert_eq!(plan.line_count, total / LINE as u64);
        // auto: 4 GiB / (4 × 4 workers) = 256 MiB shards
        assert_eq!(plan.shards.len(), 16);
        assert!(plan.shards.iter().all(|s| s.line_count == 256 * 1024 && (s.end - s.start) % LINE as u64 == 0));
        // Never more than one chunk alive at a time, whatever the input size.
        assert!(peak.load(Ordering::SeqCst) <= CHUNK as u64, "peak live bytes {}", peak.load(Ordering::SeqCst));
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }
}
