//! The engine's CUDA kernels against plain f32 references computed on the host. Needs a GPU
//! and a `--features cuda` build; runs only with `SLUICE_TEST_CUDA=1` (skipped otherwise).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use sluice_worker::engine::cuda_ops::{ProjOut, add_rms_norm};

/// The GPU when `SLUICE_TEST_CUDA=1`, else None (and the test says it skipped).
#[allow(clippy::unwrap_used)]
fn cuda() -> Option<Device> {
    if std::env::var("SLUICE_TEST_CUDA").as_deref() != Ok("1") {
        eprintln!("skipped (the CUDA part): set SLUICE_TEST_CUDA=1 (needs a GPU)");
        return None;
    }
    Some(Device::new_cuda(0).unwrap())
}

/// Queries of one check: (sequence, causal context length) per query token.
#[allow(clippy::unwrap_used)]
fn check(nh: usize, nkv: usize, hd: usize, lens: &[usize], block_size: usize) {
    // Decode-style: one query per sequence, over the whole sequence.
    let queries: Vec<(usize, usize)> = lens.iter().copied().enumerate().collect();
    check_queries(nh, nkv, hd, lens, &queries, block_size);
}

/// Prefill-style: every position of every sequence is a query over its causal prefix.
#[allow(clippy::unwrap_used)]
fn check_causal(nh: usize, nkv: usize, hd: usize, lens: &[usize], block_size: usize) {
    let queries: Vec<(usize, usize)> = lens.iter().enumerate().flat_map(|(s, &l)| (1..=l).map(move |c| (s, c))).collect();
    check_queries(nh, nkv, hd, lens, &queries, block_size);
}

/// A mixed step: decode tokens and odd-length prefill chunks that start mid-sequence, so the
/// chunked kernel sees short items and lone tokens among full chunks (and a warp whose first
/// row has one key fewer than the tile that starts at it).
#[allow(clippy::unwrap_used)]
fn check_mixed(nh: usize, nkv: usize, hd: usize, block_size: usize) {
    let lens = [300usize, 70, 33, 129];
    let mut queries = vec![(0, 300)];
    queries.extend((41..=70).map(|c| (1, c)));
    queries.push((2, 33));
    queries.extend((97..=129).map(|c| (3, c)));
    check_queries(nh, nkv, hd, &lens, &queries, block_size);
}

#[allow(clippy::unwrap_used)]
fn check_queries(nh: usize, nkv: usize, hd: usize, lens: &[usize], queries: &[(usize, usize)], block_size: usize) {
    let dev = Device::new_cuda(0).unwrap();
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64((nh * 1000 + hd) as u64);
    let b = lens.len();
    let n = queries.len();
    let max_blocks = lens.iter().map(|l| l.div_ceil(block_size)).max().unwrap();
    let num_blocks = b * max_blocks + 3;
    // A random permutation of blocks, so tables are not contiguous.
    let mut perm: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    let mut tables = vec![0u32; b * max_blocks];
    let mut next = 0;
    for (s, &l) in lens.iter().enumerate() {
        for j in 0..l.div_ceil(block_size) {
            tables[s * max_blocks + j] = perm[next];
            next += 1;
        }
    }
    let slots = num_blocks * block_size;
    let kvd = nkv * hd;
    let rnd = |n: usize, rng: &mut rand_chacha::ChaCha12Rng| -> Vec<f32> {
        (0..n).map(|_| half::bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_f32()).collect()
    };
    let q = rnd(n * nh * hd, &mut rng);
    let k = rnd(slots * kvd, &mut rng);
    let v = rnd(slots * kvd, &mut rng);
    let scale = 1.0 / (hd as f32).sqrt();
    let t = |x: &[f32], shape: &[usize]| Tensor::from_slice(x, shape, &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let rows: Vec<u32> = queries.iter().map(|&(s, _)| s as u32).collect();
    let ctx: Vec<u32> = queries.iter().map(|&(_, c)| c as u32).collect();
    use sluice_worker::engine::cuda_ops::{Prefill, prefill_chunk_tokens, query_chunks};
    // Leading one-token queries run one per block, as a step's decode tokens do.
    let first = (0..n).take_while(|&i| i + 1 >= n || rows[i + 1] != rows[i] || ctx[i + 1] != ctx[i] + 1).count();
    let to_t = |v: Vec<u32>| Tensor::from_slice(&v, v.len(), &dev).unwrap();
    let chunk = prefill_chunk_tokens(nh, nkv);
    let chunks_all = to_t(query_chunks(&rows, &ctx, 0, chunk));
    let chunks = to_t(query_chunks(&rows, &ctx, first, chunk));
    let run_on = |kc: &Tensor, vc: &Tensor, tensor_cores: bool, prefill: Option<Prefill>| {
        sluice_worker::engine::cuda_ops::paged_attention(
            &t(&q, &[n, nh, hd]),
            kc,
            vc,
            &Tensor::from_slice(&tables, (b, max_blocks), &dev).unwrap(),
            &Tensor::from_slice(&rows, n, &dev).unwrap(),
            &Tensor::from_slice(&ctx, n, &dev).unwrap(),
            nkv,
            block_size,
            scale,
            tensor_cores,
            false,
            prefill,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    };
    let (kc, vc) = (t(&k, &[slots, kvd]), t(&v, &[slots, kvd]));
    let run = |tensor_cores: bool, prefill: Option<Prefill>| run_on(&kc, &vc, tensor_cores, prefill);
    let mut kernels = vec![("cuda cores", run(false, None), false)];
    if sluice_worker::engine::cuda_ops::tensor_core_attention_supported(hd) {
        kernels.push(("tensor cores", run(true, None), false));
        kernels.push(("tensor cores, chunks", run(true, Some(Prefill { items: &chunks, first })), false));
        kernels.push(("tensor cores, all chunks", run(true, Some(Prefill { items: &chunks_all, first: 0 })), false));
    }
    // The same caches in E4M3 (rounded on the host; the reference reads the rounded values).
    let e4m3 = |x: &[f32]| -> (Vec<f32>, Tensor) {
        let c = Tensor::from_slice(x, (slots, kvd), &Device::Cpu).unwrap().to_dtype(DType::F8E4M3).unwrap();
        (c.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap(), c.to_device(&dev).unwrap())
    };
    let ((k8, k8c), (v8, v8c)) = (e4m3(&k), e4m3(&v));
    kernels.push(("cuda cores, e4m3 cache", run_on(&k8c, &v8c, false, None), true));
    if sluice_worker::engine::cuda_ops::tensor_core_attention_supported(hd) {
        kernels.push(("tensor cores, e4m3 cache", run_on(&k8c, &v8c, true, None), true));
        kernels.push(("tensor cores, e4m3 cache, chunks", run_on(&k8c, &v8c, true, Some(Prefill { items: &chunks, first })), true));
        kernels.push((
            "tensor cores, e4m3 cache, all chunks",
            run_on(&k8c, &v8c, true, Some(Prefill { items: &chunks_all, first: 0 })),
            true,
        ));
    }
    let g = nh / nkv;
    for (kernel, got, fp8) in kernels {
        let (k, v) = if fp8 { (&k8, &v8) } else { (&k, &v) };
        let worst = max_err(&q, k, v, &got, queries, &tables, (nh, nkv, hd), max_blocks, block_size, g, scale);
        eprintln!("paged_attention [{kernel}] nh={nh} nkv={nkv} hd={hd} lens={lens:?} queries={n}: max abs err {worst}");
        assert!(worst < 2e-2, "{kernel}: max abs err {worst}");
    }
}

/// Largest absolute difference of `got` from the f32 reference attention.
#[allow(clippy::too_many_arguments)]
fn max_err(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    got: &[f32],
    queries: &[(usize, usize)],
    tables: &[u32],
    (nh, nkv, hd): (usize, usize, usize),
    max_blocks: usize,
    block_size: usize,
    g: usize,
    scale: f32,
) -> f32 {
    let mut worst = 0f32;
    for (qi, &(s, l)) in queries.iter().enumerate() {
        for h in 0..nh {
            let kh = h / g;
            let qv = &q[(qi * nh + h) * hd..][..hd];
            // Position p's key of head kh in the kernels' block-major cache layout.
            let at = |p: usize| {
                let block = tables[s * max_blocks + p / block_size] as usize;
                sluice_worker::engine::cuda_ops::kv_cache_offset(block, kh, p % block_size, nkv, block_size, hd)
            };
            let scores: Vec<f32> = (0..l).map(|p| (0..hd).map(|d| qv[d] * k[at(p) + d]).sum::<f32>() * scale).collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for d in 0..hd {
                let want: f32 = (0..l).map(|p| e[p] * v[at(p) + d]).sum::<f32>() / z;
                let have = got[(qi * nh + h) * hd + d];
                worst = worst.max((want - have).abs());
            }
        }
    }
    worst
}

#[test]
fn paged_attention_matches_reference() {
    if cuda().is_none() {
        return;
    }
    check(14, 2, 64, &[1, 17, 128, 129, 300, 1000], 16);
    check(32, 8, 64, &[5, 256, 700], 16);
    check(8, 8, 128, &[1, 129, 260], 16);
    check(4, 2, 16, &[3, 40, 200], 4);
    check(28, 4, 128, &[77, 513], 32);
    check(16, 2, 256, &[1, 33, 300], 16);
    check(6, 3, 32, &[2, 95], 8);
    check(16, 2, 64, &[31, 32, 33, 64, 500], 16);
    check_causal(14, 2, 64, &[1, 37, 130], 16);
    check_mixed(14, 2, 64, 16);
    check_mixed(28, 4, 128, 32);
    check_mixed(8, 1, 64, 16);
    check_causal(8, 2, 128, &[65], 16);
}

#[test]
fn argmax_rows_matches_first_max() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(7);
    for &(rows, cols) in &[(3usize, 151_936usize), (5, 1000), (2, 37), (1, 8)] {
        // Few distinct values, so ties are common and the first index must win.
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(0..64) as f32 / 8.0).collect();
        let xt = Tensor::from_slice(&x, (rows, cols), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let got = sluice_worker::engine::cuda_ops::argmax_rows(&xt).unwrap().to_vec1::<u32>().unwrap();
        for r in 0..rows {
            let row = &x[r * cols..][..cols];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want = row.iter().position(|&v| v == m).unwrap() as u32;
            assert_eq!(got[r], want, "rows {rows} cols {cols} row {r}");
        }
    }
    eprintln!("argmax_rows: first max index on every row");
}

#[test]
fn add_rms_norm_matches_separate_ops() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(11);
    // 16-byte path (896, 4096), scalar path (100: not a multiple of 8; 4104: too wide).
    for (n, h) in [(37usize, 896usize), (5, 4096), (9, 100), (3, 4104)] {
        let mut rnd = |len: usize| -> Tensor {
            let v: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            Tensor::from_slice(&v, len, &dev).unwrap().to_dtype(DType::BF16).unwrap()
        };
        let x = rnd(n * h).reshape((n, h)).unwrap();
        let r = rnd(n * h).reshape((n, h)).unwrap();
        let w = rnd(h);
        let (sum, normed) = add_rms_norm(&x, &ProjOut::done(r.clone()), &w, 1e-6).unwrap();
        let want_sum = (&x + &r).unwrap();
        let want_norm = candle_nn::ops::rms_norm(&want_sum, &w, 1e-6).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f(&sum), f(&want_sum), "residual sums differ");
        let worst = f(&normed).iter().zip(f(&want_norm)).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        eprintln!("add_rms_norm h={h}: sums exact, normed max rel err {worst}");
        assert!(worst < 1e-2, "h={h}: normed max rel err {worst}");
        // A residual that owes FP8 scales: scaled and rounded in the kernel exactly as the
        // separate scaling pass (`ProjOut::finish`) leaves it.
        let rows = rnd(n).to_dtype(DType::F32).unwrap();
        let cols = rnd(h).to_dtype(DType::F32).unwrap();
        let owed = ProjOut { y: r.clone(), scales: Some((rows.clone(), cols.clone())) };
        let (sum_s, normed_s) = add_rms_norm(&x, &owed, &w, 1e-6).unwrap();
        let scaled = ProjOut { y: r.copy().unwrap(), scales: Some((rows, cols)) }.finish().unwrap();
        let (want_sum, want_norm) = add_rms_norm(&x, &ProjOut::done(scaled), &w, 1e-6).unwrap();
        assert_eq!(f(&sum_s), f(&want_sum), "h={h}: scaled residual sums differ");
        assert_eq!(f(&normed_s), f(&want_norm), "h={h}: scaled residual norms differ");
        let plain = sluice_worker::engine::cuda_ops::rms_norm(&x, &w, 1e-6).unwrap();
        let want_plain = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
        let worst = f(&plain).iter().zip(f(&want_plain)).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        eprintln!("rms_norm h={h}: max rel err {worst}");
        assert!(worst < 1e-2, "h={h}: rms_norm max rel err {worst}");
    }
}

#[test]
fn placeholder_tokens_resolve_and_ids_read_back_asynchronously() {
    use sluice_worker::engine::cuda_ops;
    let pending = 0x8000_0000u32;
    let ids = [5u32, pending | 2, 7, pending, pending | 1];
    let prev = [40u32, 41, 42];
    let want = vec![5u32, 42, 7, 40, 41];
    // The host fallback, everywhere.
    let cpu = cuda_ops::resolve_tokens(&Tensor::new(&ids, &Device::Cpu).unwrap(), &Tensor::new(&prev, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(cpu.to_vec1::<u32>().unwrap(), want);
    let bad = cuda_ops::resolve_tokens(&Tensor::new(&[pending | 9], &Device::Cpu).unwrap(), &Tensor::new(&prev, &Device::Cpu).unwrap());
    assert!(bad.unwrap_err().to_string().contains("row 9"));
    let Some(dev) = cuda() else { return };
    let got = cuda_ops::resolve_tokens(&Tensor::new(&ids, &dev).unwrap(), &Tensor::new(&prev, &dev).unwrap()).unwrap();
    assert_eq!(got.to_vec1::<u32>().unwrap(), want);
    // Read-back through the pinned pool: buffers are reused, and a copy started before later
    // work returns that step's ids.
    let pool = cuda_ops::ReadbackPool::default();
    for n in [3usize, 5000, 17] {
        let v: Vec<u32> = (0..n as u32).map(|i| i * 3 + 1).collect();
        let t = Tensor::from_vec(v.clone(), n, &dev).unwrap();
        let copy = cuda_ops::copy_ids_to_host(&t, &pool).unwrap();
        let later =
            (Tensor::ones((2048, 2048), DType::F32, &dev).unwrap().matmul(&Tensor::ones((2048, 2048), DType::F32, &dev).unwrap())).unwrap();
        assert_eq!(copy.wait(&pool).unwrap(), v, "{n} ids");
        drop(later);
    }
    eprintln!("resolve_tokens and the asynchronous id read-back: ok");
}

#[test]
fn small_linear_matches_cublas_and_the_fused_silu_mul() {
    let Some(dev) = cuda() else { return };
    use sluice_worker::engine::cuda_ops::{SMALL_LINEAR_ROWS, silu_mul, small_linear};
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(12);
    // The 0.5B shape's projections (qkv, gate_up), an 8B-like width, a k with a partial sweep.
    for (n, k) in [(1152usize, 896usize), (9728, 896), (256, 4096), (40, 200)] {
        for m in [1usize, 3, SMALL_LINEAR_ROWS] {
            let mut rnd = |len: usize, scale: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-scale..scale)).collect() };
            let to = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = to(&rnd(m * k, 1.0), (m, k));
            let w = to(&rnd(n * k, 0.05), (n, k));
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rel = |a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
                a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
            };
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = small_linear(&x, &w, false).unwrap().expect("applies to bf16 CUDA rows");
            assert_eq!(got.dims(), want.dims());
            let e = rel(&f(&got), &f(&want));
            eprintln!("small_linear m={m} n={n} k={k}: max err / max |y| vs cuBLAS {e:.2e}");
            assert!(e < 1e-2, "m={m} n={n} k={k}: {e}");
            let fused = small_linear(&x, &w, true).unwrap().expect("applies");
            let unfused = silu_mul(&want).unwrap();
            assert_eq!(fused.dims(), &[m, n / 2]);
            let e = rel(&f(&fused), &f(&unfused));
            eprintln!("small_linear + silu_mul m={m} n={n} k={k}: {e:.2e}");
            assert!(e < 2e-2, "silu m={m} n={n} k={k}: {e}");
        }
    }
    // Where it does not apply the caller runs the general path.
    let x = Tensor::zeros((SMALL_LINEAR_ROWS + 1, 64), DType::BF16, &dev).unwrap();
    let w = Tensor::zeros((16, 64), DType::BF16, &dev).unwrap();
    assert!(small_linear(&x, &w, false).unwrap().is_none());
    assert!(small_linear(&x.to_dtype(DType::F32).unwrap().narrow(0, 0, 2).unwrap(), &w, false).unwrap().is_none());
}
