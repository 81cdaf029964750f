//! Token sampling for one sequence from one row of logits: greedy, temperature, top-k, top-p,
//! drawing from the request's own seeded ChaCha stream (one draw per sampled token), so the
//! result depends only on the logits and the request, never on what else is in the batch.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// Temperatures at or below this are greedy.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass, in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Keep only the k most likely tokens; None = off.
    pub top_k: Option<usize>,
    /// Seed of the request's random stream.
    pub seed: u64,
    /// Completion ends (and is cut) where one of these strings appears.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { max_tokens: 16, temperature: 0.0, top_p: 1.0, top_k: None, seed: 0, stop: Vec::new(), ignore_eos: false }
    }
}

impl SamplingParams {
    /// Checks ranges; the message says which parameter is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be >= 1".into());
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be >= 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }

    /// Greedy decoding: `sample` returns the argmax and draws nothing from the stream.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= GREEDY_TEMPERATURE
    }

    /// The request's random stream.
    pub fn rng(&self) -> ChaCha12Rng {
        ChaCha12Rng::seed_from_u64(self.seed)
    }
}

/// Index of the largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Samples one token. Greedy draws nothing from `rng`; otherwise exactly one `f64` is drawn.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut ChaCha12Rng) -> u32 {
    if p.temperature <= GREEDY_TEMPERATURE || p.top_k == Some(1) {
        if p.temperature > GREEDY_TEMPERATURE {
            // Keep the stream position independent of the parameters' shape.
            let _: f64 = rng.random();
        }
        return argmax(logits);
    }
    let u: f64 = rng.random();
    let inv_t = 1.0 / f64::from(p.temperature);
    // Candidates sorted by logit, descending; ties by index for determinism.
    let mut cand: Vec<(u32, f64)> =
        logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, f64::from(v) * inv_t)).collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    let by_desc = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if let Some(k) = p.top_k
        && k < cand.len()
    {
        cand.select_nth_unstable_by(k - 1, by_desc);
        cand.truncate(k);
    }
    cand.sort_unstable_by(by_desc);
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    for x in &mut probs {
        *x /= total;
    }
    let mut keep = probs.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if acc >= f64::from(p.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    let mass: f64 = probs[..keep].iter().sum();
    let target = u * mass;
    let mut acc = 0.0;
    for (i, x) in probs[..keep].iter().enumerate() {
        acc += x;
        if target < acc {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, top_p: f32, top_k: Option<usize>, seed: u64) -> SamplingParams {
        SamplingParams { temperature: t, top_p, top_k, seed, ..SamplingParams::default() }
    }

    #[test]
    fn greedy_is_argmax() {
        let p = params(0.0, 1.0, None, 1);
        let mut rng = p.rng();
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &mut rng), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = params(1.0, 0.9, Some(20), 42);
        let run = || {
            let mut rng = p.rng();
            (0..32).map(|_| sample(&logits, &p, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        let q = params(1.0, 0.9, Some(20), 43);
        let mut rng = q.rng();
        let other: Vec<u32> = (0..32).map(|_| sample(&logits, &q, &mut rng)).collect();
        assert_ne!(run(), other);
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [5.0f32, 4.9, 0.0, -1.0, -2.0];
        let p = params(1.0, 1.0, Some(2), 7);
        let mut rng = p.rng();
        for _ in 0..200 {
            assert!(sample(&logits, &p, &mut rng) < 2);
        }
        let p = params(1.0, 0.5, None, 7);
        let mut rng = p.rng();
        for _ in 0..200 {
            assert_eq!(sample(&logits, &p, &mut rng), 0);
        }
    }

    #[test]
    fn validate_rejects_bad_params() {
        assert!(params(-1.0, 1.0, None, 0).validate().is_err());
        assert!(params(1.0, 0.0, None, 0).validate().is_err());
        assert!(params(1.0, 1.0, Some(0), 0).validate().is_err());
        assert!(params(1.0, 1.0, None, 0).validate().is_ok());
    }
}
