//! Opt-in per-phase timing of engine steps (`SLUICE_PROFILE=1`): on CUDA, device events recorded
//! on the engine's stream between the phases of a forward pass (GPU time per phase, no sync
//! inside the step); on every device, host wall time of the step's host-side phases.
//! Off by default; when off, each mark is one branch. `sluice-bench` prints the report.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

/// Accumulated time of one phase.
#[derive(Debug, Default, Clone, Copy)]
struct Total {
    ms: f64,
    count: u64,
}

/// Per-phase timer of forward passes; see the module docs.
pub struct Profiler {
    enabled: bool,
    /// Step kind prefixed to phase names (`decode` or `mixed`).
    kind: &'static str,
    gpu: BTreeMap<String, Total>,
    host: BTreeMap<String, Total>,
    host_mark: Option<Instant>,
    /// Host time of the previous device mark (or `begin`): what enqueueing each phase cost.
    gpu_mark: Option<Instant>,
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::Events>,
}

impl Profiler {
    /// A profiler, timing only when `enabled` (`EngineSwitches::profile`).
    pub fn new(device: &Device, enabled: bool) -> Self {
        let _ = device;
        Self {
            enabled,
            kind: "step",
            gpu: BTreeMap::new(),
            host: BTreeMap::new(),
            host_mark: None,
            gpu_mark: None,
            #[cfg(feature = "cuda")]
            cuda: if enabled { cuda::Events::new(device) } else { None },
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Starts a step of `kind`: the next device phase is timed from here.
    pub fn begin(&mut self, kind: &'static str) {
        if !self.enabled {
            return;
        }
        self.kind = kind;
        self.host_mark = Some(Instant::now());
        self.gpu_mark = self.host_mark;
        #[cfg(feature = "cuda")]
        if let Some(ev) = &mut self.cuda {
            ev.begin();
        }
    }

    /// Ends device phase `name` (the GPU work enqueued since the previous mark); the host time
    /// its enqueueing took goes to host phase `enqueue.<name>`.
    pub fn gpu(&mut self, name: &'static str) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if let Some(t) = self.gpu_mark.replace(now) {
            self.host_span(&format!("enqueue.{name}"), (now - t).as_secs_f64() * 1e3);
        }
        #[cfg(feature = "cuda")]
        if let Some(ev) = &mut self.cuda {
            ev.mark(name);
        }
        let _ = name;
    }

    /// Ends host phase `name` (host wall time since the previous host mark or `begin`).
    pub fn host(&mut self, name: &str) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if let Some(t) = self.host_mark.replace(now) {
            self.host_span(name, (now - t).as_secs_f64() * 1e3);
        }
    }

    /// Adds `ms` of host time to phase `name` directly.
    pub fn host_span(&mut self, name: &str, ms: f64) {
        if !self.enabled {
            return;
        }
        let e = self.host.entry(format!("{}.{name}", self.kind)).or_default();
        e.ms += ms;
        e.count += 1;
    }

    /// Collects the device timings of the step begun last (waits for its events).
    pub fn end(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(ev) = self.cuda.as_mut().filter(|_| self.enabled) {
            for (name, ms) in ev.collect() {
                let e = self.gpu.entry(format!("{}.{name}", self.kind)).or_default();
                e.ms += ms;
                e.count += 1;
            }
        }
    }

    /// Forgets the times accumulated so far (after a warm-up).
    pub fn reset(&mut self) {
        self.gpu.clear();
        self.host.clear();
    }

    /// A table of the accumulated times (None when profiling is off).
    pub fn report(&self) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let mut s = String::from("phase                               total_ms      calls    mean_us\n");
        for (title, map) in [("gpu", &self.gpu), ("host", &self.host)] {
            let sum: f64 = map.values().map(|t| t.ms).sum();
            s.push_str(&format!("-- {title} (sum {sum:.1} ms)\n"));
            for (k, t) in map {
                s.push_str(&format!("{k:<34} {:>10.1} {:>10} {:>10.1}\n", t.ms, t.count, t.ms * 1e3 / t.count.max(1) as f64));
            }
        }
        Some(s)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::Device;
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};

    /// A reusable pool of timing events on the device's stream.
    pub(super) struct Events {
        stream: Arc<CudaStream>,
        pool: Vec<CudaEvent>,
        /// Events recorded this step: (phase ending at the event, pool index); index 0 = start.
        used: Vec<(&'static str, usize)>,
    }

    impl Events {
        pub(super) fn new(device: &Device) -> Option<Self> {
            let Device::Cuda(d) = device else { return None };
            Some(Self { stream: d.cuda_stream(), pool: Vec::new(), used: Vec::new() })
        }

        fn record(&mut self, name: &'static str) {
            let i = self.used.len();
            if i == self.pool.len() {
                match self.stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
                    Ok(e) => self.pool.push(e),
                    Err(e) => {
                        tracing::warn!("profiler: cannot create a CUDA event: {e:?}");
                        return;
                    }
                }
            }
            if self.pool[i].record(&self.stream).is_ok() {
                self.used.push((name, i));
            }
        }

        pub(super) fn begin(&mut self) {
            self.used.clear();
            self.record("start");
        }

        pub(super) fn mark(&mut self, name: &'static str) {
            if !self.used.is_empty() {
                self.record(name);
            }
        }

        pub(super) fn collect(&mut self) -> Vec<(&'static str, f64)> {
            let mut out = Vec::with_capacity(self.used.len());
            for w in self.used.windows(2) {
                if let Ok(ms) = self.pool[w[0].1].elapsed_ms(&self.pool[w[1].1]) {
                    out.push((w[1].0, f64::from(ms)));
                }
            }
            self.used.clear();
            out
        }
    }
}
