//! The engine's own thread (text-embeddings-inference style): the async runtime submits
//! requests over a channel and awaits a oneshot reply per request; the thread loads the model
//! and steps the engine while it has work. No async code runs on the engine thread.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::error::{EngineError, RequestError};
use super::llm_engine::{EngineConfig, EngineStats, GenerationOutput, GenerationRequest, LlmEngine};

type Reply = oneshot::Sender<Result<GenerationOutput, RequestError>>;

enum Command {
    Submit(GenerationRequest, Reply),
    Shutdown,
}

/// Static facts about the loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub max_model_len: usize,
    pub device: String,
}

/// A cloneable-by-reference handle to an engine running on its own thread.
pub struct EngineHandle {
    tx: Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    info: ModelInfo,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the engine thread and loads the model on it; returns once loading is done.
    pub fn spawn(cfg: EngineConfig) -> Result<Self, EngineError> {
        Self::spawn_with(move || LlmEngine::load(&cfg))
    }

    /// Like `spawn`, with any engine constructor (e.g. `LlmEngine::random`).
    pub fn spawn_with<F>(make: F) -> Result<Self, EngineError>
    where
        F: FnOnce() -> Result<LlmEngine, EngineError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(ModelInfo, EngineStats), EngineError>>(1);
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let shared = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || {
                let engine = match make() {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let info = ModelInfo {
                    name: engine.model_name().to_string(),
                    max_model_len: engine.max_model_len(),
                    device: engine.device_name(),
                };
                if ready_tx.send(Ok((info, engine.stats()))).is_err() {
                    return;
                }
                run(engine, &rx, &shared);
            })
            .map_err(|e| EngineError::Thread(format!("cannot start engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok((info, s))) => {
                if let Ok(mut g) = stats.lock() {
                    *g = s;
                }
                Ok(Self { tx, stats, info, thread: Some(thread) })
            }
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Thread("engine thread exited while loading".into()))
            }
        }
    }

    /// Queues a request; the receiver resolves when it finishes or fails.
    pub fn submit(&self, r: GenerationRequest) -> oneshot::Receiver<Result<GenerationOutput, RequestError>> {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(Command::Submit(_, reply))) = self.tx.send(Command::Submit(r, reply)) {
            let _ = reply.send(Err(RequestError::Shutdown));
        }
        rx
    }

    /// The latest counters (updated after every step).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Stops the engine thread; requests still in flight get `RequestError::Shutdown`.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept(engine: &mut LlmEngine, replies: &mut HashMap<u64, Reply>, r: GenerationRequest, reply: Reply) {
    if replies.contains_key(&r.id) {
        let _ = reply.send(Err(RequestError::DuplicateId(r.id)));
        return;
    }
    replies.insert(r.id, reply);
    engine.add_request(r);
}

fn run(mut engine: LlmEngine, rx: &Receiver<Command>, stats: &Mutex<EngineStats>) {
    let mut replies: HashMap<u64, Reply> = HashMap::new();
    let mut shutting_down = false;
    'outer: loop {
        // Block for work when idle; otherwise take whatever has arrived without waiting.
        if !engine.has_work() {
            match rx.recv() {
                Ok(Command::Submit(r, reply)) => accept(&mut engine, &mut replies, r, reply),
                Ok(Command::Shutdown) | Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Submit(r, reply)) => accept(&mut engine, &mut replies, r, reply),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    shutting_down = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if shutting_down {
            break 'outer;
        }
        let results = match engine.step() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing requests in flight");
                engine.abort_all(&e.to_string())
            }
        };
        // Publish the stats before replying, so a caller holding a reply sees stats that count it.
        if let Ok(mut g) = stats.lock() {
            *g = engine.stats();
        }
        for (id, res) in results {
            if let Some(reply) = replies.remove(&id) {
                let _ = reply.send(res);
            }
        }
    }
    for (_, reply) in replies.drain() {
        let _ = reply.send(Err(RequestError::Shutdown));
    }
}
