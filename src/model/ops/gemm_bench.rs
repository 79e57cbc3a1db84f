//! `afinar bench gemm`: the frozen-base products of a training step, timed kernel by kernel —
//! f32 (`gemm` crate) against bf16 (`bf16_gemm.rs`, packing included) on the shapes of a 4 × 256
//! batch through a model's projections, and the bf16 micro-kernel alone on in-cache operands
//! (this machine's peak, against which a training step's GFLOP/s is read).

use std::time::Instant;

use serde_json::{json, Value};

use super::bf16_gemm;
use super::packed_matmul::{matmul_w, matmul_wt, MatmulMode, WeightRef};

/// Median seconds of `runs` calls of `f` after one warm-up.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32
                - 0.5
        })
        .collect()
}

/// Times y = x Wᵀ and dx = dy W for `m` rows over each (n, k) weight shape, f32 and bf16.
pub fn run(m: usize, shapes: &[(usize, usize)], runs: usize) -> Value {
    let bf16_ok = bf16_gemm::available();
    let mut rows = Vec::new();
    for &(n, k) in shapes {
        let (x, w, dy) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
        let (mut y, mut dx) = (vec![0f32; m * n], vec![0f32; m * k]);
        let flops = 2.0 * (m * n * k) as f64;
        let mut row = json!({"m": m, "n": n, "k": k});
        for (name, bf16) in [("f32", false), ("bf16", true)] {
            if bf16 && !bf16_ok {
                continue;
            }
            let mode = MatmulMode {
                quantized_dot: false,
                bf16,
            };
            let fwd = time(runs, || {
                matmul_wt(&x, WeightRef::F32(&w), (m, n, k), &mut y, false, mode).unwrap()
            });
            let bwd = time(runs, || {
                matmul_w(&dy, WeightRef::F32(&w), (m, n, k), &mut dx, false, mode).unwrap()
            });
            row[name] = json!({"fwd_gflops": flops / fwd / 1e9, "bwd_gflops": flops / bwd / 1e9});
        }
        rows.push(row);
    }
    let peak = bf16_ok.then(|| {
        // One thread per core on operands that stay in cache: what the micro-kernel can do.
        let (m, n, k) = (128usize, 256usize, 512usize);
        let k2 = bf16_gemm::pairs(k);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        bf16_gemm::pack_a(&values(m * k, 4), (m, k), &mut a);
        bf16_gemm::pack_bt(&values(n * k, 5), (n, k), &mut b);
        let threads = rayon::current_num_threads();
        let reps = 20;
        let s = time(runs, || {
            use rayon::prelude::*;
            (0..threads).into_par_iter().for_each(|_| {
                let mut c = vec![0f32; m * n];
                for _ in 0..reps {
                    // SAFETY: c is this task's own m × n buffer; the CPU has the features
                    // (`available` checked above).
                    unsafe {
                        bf16_gemm::gemm(
                            (&a, k2),
                            (&b, bf16_gemm::packed_cols(n)),
                            (m, n, k2),
                            c.as_mut_ptr(),
                            n,
                            true,
                        )
                    };
                }
                std::hint::black_box(&c);
            })
        });
        2.0 * (m * n * k * reps * threads) as f64 / s / 1e9
    });
    json!({
        "mode": "gemm",
        "threads": rayon::current_num_threads(),
        "cpu": super::cpu_description(),
        "bf16_microkernel_peak_gflops": peak,
        "products": rows,
    })
}
