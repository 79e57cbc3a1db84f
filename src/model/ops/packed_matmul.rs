//! The two products every linear layer needs, for a weight W (n × k) held in f32 or packed
//! (bf16, f16, GGUF blocks): `y = x Wᵀ` (forward) and `dx = dy W` (the input gradient).
//!
//! Why our own: a packed weight must never be expanded whole to f32 (a 7B model would need
//! 28 GB), and candle's `QMatMul` has no backward. Here a tile of W's rows is dequantized into
//! an f32 panel that stays in cache and multiplied by the `gemm` crate's kernels, so the f32
//! copy alive at any time is one panel per thread. For decoding (a few rows of x) the
//! activations are instead quantized per block and dotted with W's blocks directly
//! (`quant_dot.rs`, llama.cpp's method), which reads W once at its packed size.

use candle_core::quantized::GgmlDType;
use candle_core::Result;
use rayon::prelude::*;

use super::cpu::{gemm, gemm_shared, mat, view, F32View, SharedMut};
use super::packed::{packed_ref, PackedRef};
use super::{bf16_gemm, block_dot, quant_dot};
use crate::model::weights::Weight;

/// A weight matrix (n × k, PyTorch's (out, in) layout) as the kernels read it.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Packed(PackedRef<'a>),
}

/// A [`Weight`]'s data borrowed for the kernels (an f32 weight's storage stays read-locked
/// while this lives).
pub enum WeightView<'a> {
    F32(F32View<'a>),
    Packed(PackedRef<'a>),
}

impl WeightView<'_> {
    pub fn get(&self) -> WeightRef<'_> {
        match self {
            WeightView::F32(v) => WeightRef::F32(v),
            WeightView::Packed(p) => WeightRef::Packed(*p),
        }
    }
}

/// Borrows `w`'s data (see [`WeightView`]).
pub fn weight_view(w: &Weight) -> Result<WeightView<'_>> {
    Ok(match w {
        Weight::Dense(t) => WeightView::F32(view(t)?),
        Weight::Packed(q) => WeightView::Packed(packed_ref(q)?),
    })
}

/// How a product may be computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulMode {
    /// For at most [`DOT_ROWS`] rows of x and a block-quantized W, quantize x per block and
    /// use integer dot products (faster decoding; results differ from the f32 path by the
    /// activations' rounding). False keeps every product exact in f32.
    pub quantized_dot: bool,
    /// For more than [`DOT_ROWS`] rows of x, round x and W to bf16 and multiply them with
    /// AVX512-BF16's pair dot products, accumulating in f32 (`bf16_gemm.rs`; training's
    /// `compute = "bf16"`). Ignored where the CPU lacks the instructions.
    pub bf16: bool,
}

impl Default for MatmulMode {
    /// Exact (see [`crate::model::Transformer::quantized_dot`]).
    fn default() -> Self {
        Self {
            quantized_dot: false,
            bf16: false,
        }
    }
}

impl MatmulMode {
    /// Whether a product over `m` rows of x takes the bf16 kernels (and so can use
    /// [`Bf16Panels`]).
    pub fn takes_bf16(&self, m: usize) -> bool {
        self.bf16 && m > DOT_ROWS && bf16_gemm::available()
    }
}

/// Most rows of x for which the quantized dot products are used.
pub const DOT_ROWS: usize = 4;

/// f32 elements of one dequantized panel (256 KiB: inside L2 on every CPU users have).
const PANEL_ELEMS: usize = 64 * 1024;

/// Rows of W per panel for `k` columns: a multiple of 16 between 16 and 512.
fn panel_rows(k: usize) -> usize {
    ((PANEL_ELEMS / k.max(1)) / 16 * 16).clamp(16, 512)
}

/// `y (m × n) [+]= x (m × k) · Wᵀ`.
pub fn matmul_wt(
    x: &[f32],
    w: WeightRef,
    dims: (usize, usize, usize),
    y: &mut [f32],
    accumulate: bool,
    mode: MatmulMode,
) -> Result<()> {
    matmul_wt_dense_below(x, w, dims, y, accumulate, mode, DENSE_BYTES)
}

/// [`matmul_wt`], dequantizing W whole when it takes at most `dense_bytes` in f32.
fn matmul_wt_dense_below(
    x: &[f32],
    w: WeightRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
    accumulate: bool,
    mode: MatmulMode,
    dense_bytes: usize,
) -> Result<()> {
    assert_eq!(x.len(), m * k, "matmul_wt: x is not {m}×{k}");
    assert_eq!(y.len(), m * n, "matmul_wt: y is not {m}×{n}");
    if let WeightRef::Packed(p) = &w {
        check(p, n, k);
    }
    if mode.takes_bf16(m) {
        return bf16_wt(x, w, (m, n, k), y, accumulate);
    }
    let p = match w {
        WeightRef::F32(w) => {
            gemm(
                (m, n, k),
                (y, n, 1),
                accumulate,
                mat(x, k, 1),
                mat(w, 1, k),
                1.0,
                true,
            );
            return Ok(());
        }
        WeightRef::Packed(p) => p,
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    if m <= DOT_ROWS {
        let int8 = mode.quantized_dot && quant_dot::supported(p.dtype, k);
        let mut t = vec![0f32; if accumulate { m * n } else { 0 }];
        let out = if accumulate { &mut t[..] } else { &mut y[..] };
        if int8 {
            quant_dot::matmul_wt(x, p, (m, n, k), out)?;
        } else {
            block_dot::matmul_wt(x, p, (m, n, k), out)?;
        }
        if accumulate {
            y.iter_mut().zip(&t).for_each(|(y, t)| *y += t);
        }
        return Ok(());
    }
    if n * k * 4 <= dense_bytes {
        let w = dequantize_all(p, (n, k))?;
        return matmul_wt(x, WeightRef::F32(&w), (m, n, k), y, accumulate, mode);
    }
    let nb = panel_rows(k);
    let tiles = n.div_ceil(nb);
    let shared = SharedMut::new(y);
    (0..tiles).into_par_iter().try_for_each(|t| -> Result<()> {
        with_panel(nb * k, |panel| {
            let (r0, r1) = (t * nb, ((t + 1) * nb).min(n));
            let panel = &mut panel[..(r1 - r0) * k];
            p.dequantize_rows(r0, r1, panel)?;
            // SAFETY: this task writes only columns r0..r1 of y (m rows, row stride n,
            // starting at element r0), which no other tile touches; x and the panel are
            // separate buffers.
            unsafe {
                gemm_shared(
                    (m, r1 - r0, k),
                    (shared, r0, n, 1),
                    accumulate,
                    mat(x, k, 1),
                    mat(panel, 1, k),
                    1.0,
                    false,
                )
            };
            Ok(())
        })
    })
}

/// `y = x Wᵀ` with every row of x computed exactly as it would be alone, for any number of rows:
/// the decoding products of `block_dot.rs` (or, with `mode.quantized_dot`, the 8-bit ones of
/// `quant_dot.rs`) against a packed W, and the same row-by-row dot products against an f32 W.
///
/// Why: batched decoding (`model::decode`) must give a sequence the same tokens whichever
/// others share its step, and the GEMM paths of [`matmul_wt`] sum in an order that depends on
/// how many rows there are. W is still read once for all rows: each of its rows is loaded (and
/// dequantized) once, then multiplied with every row of x while it is in cache.
pub fn matmul_wt_rows(
    x: &[f32],
    w: WeightRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
    mode: MatmulMode,
) -> Result<()> {
    assert_eq!(x.len(), m * k, "matmul_wt_rows: x is not {m}×{k}");
    assert_eq!(y.len(), m * n, "matmul_wt_rows: y is not {m}×{n}");
    if m == 0 || n == 0 {
        return Ok(());
    }
    match w {
        WeightRef::Packed(p) => {
            check(&p, n, k);
            if mode.quantized_dot && quant_dot::supported(p.dtype, k) {
                quant_dot::matmul_wt(x, p, (m, n, k), y)
            } else if p.dtype == GgmlDType::BF16 {
                block_dot::matmul_wt(x, p, (m, n, k), y)
            } else if super::rows_quant::supported(p.dtype) {
                let rb = p.row_bytes();
                let g = super::rows_quant::X_ROWS_IN_CACHE;
                block_dot::by_output_rows_grouped(y, m, n, g, |j, r0, out, _| {
                    let xs = &x[r0 * k..(r0 + out.len()) * k];
                    super::rows_quant::dot_rows(p.dtype, &p.bytes[j * rb..(j + 1) * rb], xs, out);
                    Ok(())
                })
            } else {
                // Each row of W dequantized once into a buffer that stays in L1, then multiplied
                // with every row of x (the fused per-row kernels of `block_dot.rs` would unpack
                // it again for each).
                block_dot::by_output_rows(y, m, n, |j, out, row| {
                    row.resize(k, 0.0);
                    p.dequantize_rows(j, j + 1, row)?;
                    super::rows_dot::dot_rows(super::rows_dot::WRow::F32(row), x, out);
                    Ok(())
                })
            }
        }
        WeightRef::F32(w) => block_dot::by_output_rows(y, m, n, |j, out, _| {
            super::rows_dot::dot_rows(super::rows_dot::WRow::F32(&w[j * k..(j + 1) * k]), x, out);
            Ok(())
        }),
    }
}

/// Largest packed weight that an f32 product over many rows dequantizes whole (64 MiB of f32):
/// one GEMM over all of W then packs x once and splits the work as it likes, where tiles of W
/// cost one GEMM call each, every call packing x again (0.7× the speed of an f32 base in a
/// profile of a Q8_0 1.5B). A transformer's projections fit; larger weights (a 7B's MLP, most
/// LM heads) go tile by tile.
const DENSE_BYTES: usize = 64 << 20;

/// All of a packed W (n × k) in f32, its row tiles dequantized in parallel.
pub fn dequantize_all(p: PackedRef, (n, k): (usize, usize)) -> Result<Vec<f32>> {
    let mut w = vec![0f32; n * k];
    let nb = panel_rows(k);
    w.par_chunks_mut(nb * k)
        .enumerate()
        .try_for_each(|(t, out)| p.dequantize_rows(t * nb, t * nb + out.len() / k, out))?;
    Ok(w)
}

/// Runs `f` on this thread's panel buffer of at least `len` f32s. A training step makes
/// hundreds of products; reusing one panel per thread instead of allocating one per task keeps
/// the allocator out of the loop (with the trim threshold `main` sets, freed panels of every
/// size would otherwise accumulate as fragments).
fn with_panel<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PANEL.with(|cell| {
        // A nested call (none today) gets its own buffer rather than a borrow panic.
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return f(&mut vec![0f32; len]);
        };
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// `dx (m × k) [+]= dy (m × n) · W`.
pub fn matmul_w(
    dy: &[f32],
    w: WeightRef,
    dims: (usize, usize, usize),
    dx: &mut [f32],
    accumulate: bool,
    mode: MatmulMode,
) -> Result<()> {
    matmul_w_dense_below(dy, w, dims, dx, accumulate, mode, DENSE_BYTES)
}

/// [`matmul_w`], dequantizing W whole when it takes at most `dense_bytes` in f32.
fn matmul_w_dense_below(
    dy: &[f32],
    w: WeightRef,
    (m, n, k): (usize, usize, usize),
    dx: &mut [f32],
    accumulate: bool,
    mode: MatmulMode,
    dense_bytes: usize,
) -> Result<()> {
    assert_eq!(dy.len(), m * n, "matmul_w: dy is not {m}×{n}");
    assert_eq!(dx.len(), m * k, "matmul_w: dx is not {m}×{k}");
    if let WeightRef::Packed(p) = &w {
        check(p, n, k);
    }
    if mode.takes_bf16(m) {
        return bf16_w(dy, w, (m, n, k), dx, accumulate);
    }
    let p = match w {
        WeightRef::F32(w) => {
            gemm(
                (m, k, n),
                (dx, k, 1),
                accumulate,
                mat(dy, n, 1),
                mat(w, k, 1),
                1.0,
                true,
            );
            return Ok(());
        }
        WeightRef::Packed(p) => p,
    };
    if n * k * 4 <= dense_bytes {
        let w = dequantize_all(p, (n, k))?;
        return matmul_w(dy, WeightRef::F32(&w), (m, n, k), dx, accumulate, mode);
    }
    if !accumulate {
        dx.fill(0.0);
    }
    if m == 0 || k == 0 {
        return Ok(());
    }
    // Every tile of W contributes to every element of dx, so tasks split dx by rows and each
    // walks all of W's tiles (dequantizing each once per task: n·k per task, against m·n·k
    // for the products).
    let nb = panel_rows(k);
    let tasks = rayon::current_num_threads().clamp(1, m);
    let chunk = m.div_ceil(tasks);
    dx.par_chunks_mut(chunk * k)
        .zip(dy.par_chunks(chunk * n))
        .try_for_each(|(dx, dy)| -> Result<()> {
            let rows = dx.len() / k;
            with_panel(nb * k, |panel| {
                for r0 in (0..n).step_by(nb) {
                    let r1 = (r0 + nb).min(n);
                    let panel = &mut panel[..(r1 - r0) * k];
                    p.dequantize_rows(r0, r1, panel)?;
                    gemm(
                        (rows, k, r1 - r0),
                        (dx, k, 1),
                        true,
                        mat(&dy[r0..], n, 1),
                        mat(panel, k, 1),
                        1.0,
                        false,
                    );
                }
                Ok(())
            })
        })
}

/// Rows of W per bf16 panel: [`panel_rows`] rounded down to the micro-kernel's width (so no
/// packed column is padding) and kept even (pairs of rows in the input gradient).
fn bf16_panel_rows(k: usize) -> usize {
    (panel_rows(k) / bf16_gemm::NR * bf16_gemm::NR).max(bf16_gemm::NR)
}

/// W's rows r0..r1 in f32: a slice of an f32 weight, or dequantized into `panel`.
fn rows_f32<'a>(
    w: WeightRef<'a>,
    (r0, r1): (usize, usize),
    k: usize,
    panel: &'a mut [f32],
) -> Result<&'a [f32]> {
    Ok(match w {
        WeightRef::F32(w) => &w[r0 * k..r1 * k],
        WeightRef::Packed(p) => {
            let panel = &mut panel[..(r1 - r0) * k];
            p.dequantize_rows(r0, r1, panel)?;
            panel
        }
    })
}

/// Each thread's packed-pair buffer for the bf16 kernels (reused, as [`with_panel`]).
fn with_pairs<R>(f: impl FnOnce(&mut Vec<u32>) -> R) -> R {
    thread_local! {
        static PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PAIRS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}

/// x (m × k) as bf16 pairs, rows converted in parallel.
fn pack_rows(x: &[f32], (m, k): (usize, usize)) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let k2 = bf16_gemm::pairs(k);
    let mut a = vec![0u32; m * k2];
    let rows = super::cpu::rows_per_task(k).max(1);
    a.par_chunks_mut(rows * k2)
        .zip(x.par_chunks(rows * k))
        .for_each(|(dst, src)| bf16_gemm::pack_a_into(src, (src.len() / k, k), dst));
    a
}

/// W converted once into the bf16 kernels' packed pairs, tile by tile, for products that would
/// otherwise convert it again: every task of an input gradient walks all of W's tiles, and the
/// LM head meets the same W in each block of rows.
pub struct Bf16Panels {
    /// W's shape (out × in).
    n: usize,
    k: usize,
    /// Rows of W per tile ([`bf16_panel_rows`]).
    nb: usize,
    /// Packed for the input gradient dx = dy W ([`bf16_gemm::pack_b`]); else for the forward
    /// product y = x Wᵀ ([`bf16_gemm::pack_bt`]).
    for_dx: bool,
    /// Start of each tile in `data`, and the end.
    offsets: Vec<usize>,
    data: Vec<u32>,
}

impl Bf16Panels {
    /// Converts W (n × k) tile by tile in parallel.
    pub fn build(w: WeightRef, (n, k): (usize, usize), for_dx: bool) -> Result<Self> {
        if let WeightRef::Packed(p) = &w {
            check(p, n, k);
        }
        let nb = bf16_panel_rows(k);
        let size = |r0: usize| {
            let rows = nb.min(n - r0);
            if for_dx {
                bf16_gemm::pairs(rows) * bf16_gemm::packed_cols(k)
            } else {
                bf16_gemm::pairs(k) * bf16_gemm::packed_cols(rows)
            }
        };
        let mut offsets = vec![0];
        for r0 in (0..n).step_by(nb.max(1)) {
            offsets.push(offsets.last().unwrap() + size(r0));
        }
        let mut data = vec![0u32; *offsets.last().unwrap()];
        let mut tiles = Vec::with_capacity(offsets.len());
        let mut rest = &mut data[..];
        for (t, win) in offsets.windows(2).enumerate() {
            let (tile, tail) = rest.split_at_mut(win[1] - win[0]);
            tiles.push((t * nb, tile));
            rest = tail;
        }
        tiles
            .into_par_iter()
            .try_for_each(|(r0, out)| -> Result<()> {
                let r1 = (r0 + nb).min(n);
                with_panel(nb * k, |panel| {
                    let rows = rows_f32(w, (r0, r1), k, panel)?;
                    if for_dx {
                        bf16_gemm::pack_b_into(rows, (r1 - r0, k), out);
                    } else {
                        bf16_gemm::pack_bt_into(rows, (r1 - r0, k), out);
                    }
                    Ok(())
                })
            })?;
        Ok(Self {
            n,
            k,
            nb,
            for_dx,
            offsets,
            data,
        })
    }

    /// The packed tile starting at W's row `r0` (a multiple of `nb`).
    fn tile(&self, r0: usize) -> &[u32] {
        let t = r0 / self.nb;
        &self.data[self.offsets[t]..self.offsets[t + 1]]
    }
}

/// Bytes of both [`Bf16Panels`] of an n × k weight: 2 bytes per element each, plus padding.
pub fn bf16_panels_bytes((n, k): (usize, usize)) -> usize {
    2 * 2 * n * k
}

/// One tile's product: columns r0..r1 of y (m × n) [+]= A (x's packed pairs) · tile.
///
/// # Safety
/// No other thread touches columns r0..r1 of y meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn wt_tile(
    (a, k2): (&[u32], usize),
    b: &[u32],
    (r0, r1): (usize, usize),
    (m, n): (usize, usize),
    shared: &SharedMut,
    accumulate: bool,
) {
    // SAFETY: this task writes only columns r0..r1 of y (m rows, stride n), which no other
    // tile touches (caller's contract); the region's extent from element r0 is asserted by
    // `ptr_at`.
    unsafe {
        let c = shared.ptr_at(r0, (m - 1) * n + (r1 - r0));
        bf16_gemm::gemm(
            (a, k2),
            (b, bf16_gemm::packed_cols(r1 - r0)),
            (m, r1 - r0, k2),
            c,
            n,
            accumulate,
        );
    }
}

/// [`matmul_wt`] in bf16 (W's shape already checked): tiles of W's rows in parallel, each
/// converted to packed pairs and multiplied by all of x's rows into its columns of y.
fn bf16_wt(
    x: &[f32],
    w: WeightRef,
    (m, n, k): (usize, usize, usize),
    y: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let a = pack_rows(x, (m, k));
    let k2 = bf16_gemm::pairs(k);
    let nb = bf16_panel_rows(k);
    let shared = SharedMut::new(y);
    (0..n.div_ceil(nb))
        .into_par_iter()
        .try_for_each(|t| -> Result<()> {
            let (r0, r1) = (t * nb, ((t + 1) * nb).min(n));
            with_panel(nb * k, |panel| {
                let rows = rows_f32(w, (r0, r1), k, panel)?;
                with_pairs(|b| {
                    bf16_gemm::pack_bt(rows, (r1 - r0, k), b);
                    // SAFETY: tile t owns columns r0..r1 of y.
                    unsafe { wt_tile((&a, k2), b, (r0, r1), (m, n), &shared, accumulate) };
                });
                Ok(())
            })
        })
}

/// `y (m × n) [+]= x (m × k) · Wᵀ` over W's panels packed once ([`Bf16Panels`] for the forward
/// product).
pub fn matmul_wt_panels(x: &[f32], w: &Bf16Panels, m: usize, y: &mut [f32], accumulate: bool) {
    let (n, k) = (w.n, w.k);
    assert!(
        !w.for_dx,
        "matmul_wt_panels: panels packed for the input gradient"
    );
    assert_eq!(x.len(), m * k, "matmul_wt_panels: x is not {m}×{k}");
    assert_eq!(y.len(), m * n, "matmul_wt_panels: y is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    let a = pack_rows(x, (m, k));
    let k2 = bf16_gemm::pairs(k);
    let shared = SharedMut::new(y);
    (0..n).into_par_iter().step_by(w.nb).for_each(|r0| {
        let r1 = (r0 + w.nb).min(n);
        // SAFETY: the tile at r0 owns columns r0..r1 of y.
        unsafe { wt_tile((&a, k2), w.tile(r0), (r0, r1), (m, n), &shared, accumulate) };
    });
}

/// [`matmul_w`] in bf16 (W's shape already checked): dx's rows split between tasks, each
/// accumulating every tile of W's product; W's tiles packed once and shared when W is small.
fn bf16_w(
    dy: &[f32],
    w: WeightRef,
    (m, n, k): (usize, usize, usize),
    dx: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    if m == 0 || k == 0 {
        return Ok(());
    }
    if n == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return Ok(());
    }
    // A small W is packed once and shared: every task reads it while it is still in cache.
    // A large one would be packed to memory and read back from there by every task, which
    // costs more than each task packing its own tiles as it goes (a 1.5B's MLP: 0.67× PEFT
    // bf16 against 0.97×).
    if bf16_gemm::pairs(n) * bf16_gemm::packed_cols(k) * 4 <= SHARED_PANELS_BYTES {
        let panels = Bf16Panels::build(w, (n, k), true)?;
        matmul_w_panels(dy, &panels, m, dx, accumulate);
        return Ok(());
    }
    let a = pack_rows(dy, (m, n));
    let n2 = bf16_gemm::pairs(n);
    let nb = bf16_panel_rows(k);
    let tasks = rayon::current_num_threads().clamp(1, m);
    let chunk = m.div_ceil(tasks);
    dx.par_chunks_mut(chunk * k)
        .zip(a.par_chunks(chunk * n2))
        .try_for_each(|(dx, a)| -> Result<()> {
            let rows = dx.len() / k;
            with_panel(nb * k, |panel| {
                with_pairs(|b| {
                    for r0 in (0..n).step_by(nb) {
                        let r1 = (r0 + nb).min(n);
                        let wr = rows_f32(w, (r0, r1), k, panel)?;
                        bf16_gemm::pack_b(wr, (r1 - r0, k), b);
                        // SAFETY: dx is this task's exclusive rows × k chunk; r0 is even (nb
                        // is), so pair r0/2 of each dy row starts W's row r0.
                        unsafe {
                            bf16_gemm::gemm(
                                (&a[r0 / 2..], n2),
                                (b, bf16_gemm::packed_cols(k)),
                                (rows, k, bf16_gemm::pairs(r1 - r0)),
                                dx.as_mut_ptr(),
                                k,
                                accumulate || r0 > 0,
                            )
                        };
                    }
                    Ok(())
                })
            })
        })
}

/// Largest packed W (bytes) that an input gradient packs once and shares between its tasks.
const SHARED_PANELS_BYTES: usize = 8 << 20;

/// `dx (m × k) [+]= dy (m × n) · W` over W's panels packed once ([`Bf16Panels`] for the input
/// gradient).
pub fn matmul_w_panels(dy: &[f32], w: &Bf16Panels, m: usize, dx: &mut [f32], accumulate: bool) {
    let (n, k) = (w.n, w.k);
    assert!(
        w.for_dx,
        "matmul_w_panels: panels packed for the forward product"
    );
    assert_eq!(dy.len(), m * n, "matmul_w_panels: dy is not {m}×{n}");
    assert_eq!(dx.len(), m * k, "matmul_w_panels: dx is not {m}×{k}");
    if m == 0 || k == 0 {
        return;
    }
    let a = pack_rows(dy, (m, n));
    let n2 = bf16_gemm::pairs(n);
    let tasks = rayon::current_num_threads().clamp(1, m);
    let chunk = m.div_ceil(tasks);
    dx.par_chunks_mut(chunk * k)
        .zip(a.par_chunks(chunk * n2))
        .for_each(|(dx, a)| {
            let rows = dx.len() / k;
            for r0 in (0..n).step_by(w.nb) {
                let r1 = (r0 + w.nb).min(n);
                // SAFETY: dx is this task's exclusive rows × k chunk; r0 is even (nb is), so
                // pair r0/2 of each dy row starts W's row r0.
                unsafe {
                    bf16_gemm::gemm(
                        (&a[r0 / 2..], n2),
                        (w.tile(r0), bf16_gemm::packed_cols(k)),
                        (rows, k, bf16_gemm::pairs(r1 - r0)),
                        dx.as_mut_ptr(),
                        k,
                        accumulate || r0 > 0,
                    )
                };
            }
        });
}

fn check(p: &PackedRef, n: usize, k: usize) {
    assert!(
        p.rows == n && p.cols == k,
        "packed weight is {}×{}, the product needs {n}×{k}",
        p.rows,
        p.cols
    );
}

/// GGUF block formats (not f32/f16/bf16, whose dot products would round x to 16 bits).
pub fn is_block_quantized(d: GgmlDType) -> bool {
    !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::packed::packed_ref;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Naive f64 products against a dequantized W.
    fn reference(x: &[f32], w: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum();
            }
        }
        y
    }

    fn max_rel(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(1e-6f64, |a, b| a.max(b.abs()));
        got.iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs() / scale)
            .fold(0.0, f64::max)
    }

    #[test]
    fn row_exact_products_do_not_depend_on_the_other_rows() -> Result<()> {
        let dev = Device::Cpu;
        // 19 rows: two whole groups of `rows_quant::X_ROWS_IN_CACHE` and a partial one; 150 W
        // rows: two whole tasks of 64 and a partial one.
        let (m, n, k) = (19, 150, 128);
        let wt = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
            .flatten_all()?
            .to_vec1()?;
        let wf: Vec<f32> = wt.flatten_all()?.to_vec1()?;
        for dtype in [
            None,
            Some(GgmlDType::BF16),
            Some(GgmlDType::Q8_0),
            Some(GgmlDType::Q4_1),
        ] {
            for int8 in [false, true] {
                let mode = MatmulMode {
                    quantized_dot: int8,
                    bf16: false,
                };
                let q = dtype.map(|d| QTensor::quantize(&wt, d)).transpose()?;
                let (w, wd) = match &q {
                    Some(q) => (
                        WeightRef::Packed(packed_ref(q)?),
                        q.dequantize(&dev)?.flatten_all()?.to_vec1()?,
                    ),
                    None => (WeightRef::F32(&wf), wf.clone()),
                };
                let mut all = vec![0f32; m * n];
                matmul_wt_rows(&x, w, (m, n, k), &mut all, mode)?;
                // Each row alone: bit for bit the same.
                for r in 0..m {
                    let mut one = vec![0f32; n];
                    matmul_wt_rows(&x[r * k..(r + 1) * k], w, (1, n, k), &mut one, mode)?;
                    assert_eq!(
                        one,
                        all[r * n..(r + 1) * n],
                        "{dtype:?} int8 {int8} row {r}"
                    );
                }
                // And the products themselves right (the 8-bit ones within their rounding).
                let tol = if int8 && matches!(dtype, Some(GgmlDType::Q8_0 | GgmlDType::Q4_1)) {
                    5e-2
                } else {
                    1e-5
                };
                let err = max_rel(&all, &reference(&x, &wd, (m, n, k)));
                assert!(err < tol, "{dtype:?} int8 {int8}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn tiled_products_equal_dense_ones_over_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let exact = MatmulMode::default();
        // The last field: W is dequantized whole up to this many f32 bytes, else tile by tile.
        let whole = usize::MAX;
        for (m, n, k, limit) in [
            (1, 7, 32, 0),
            (3, 33, 64, 0),
            (37, 1000, 256, 0),
            (37, 1000, 256, whole),
            (5, 17, 576, 0),
            (5, 17, 576, whole),
        ] {
            for dtype in [
                GgmlDType::BF16,
                GgmlDType::F16,
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q6K,
            ] {
                if k % dtype.block_size() != 0 {
                    continue;
                }
                let wt = Tensor::randn(0f32, 1., (n, k), &dev)?;
                let q = QTensor::quantize(&wt, dtype)?;
                let wd: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
                let p = WeightRef::Packed(packed_ref(&q)?);
                let x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
                    .flatten_all()?
                    .to_vec1()?;
                // Forward, written then accumulated.
                let want = reference(&x, &wd, (m, n, k));
                let mut y = vec![0f32; m * n];
                matmul_wt_dense_below(&x, p, (m, n, k), &mut y, false, exact, limit)?;
                assert!(max_rel(&y, &want) < 1e-5, "{dtype:?} {m}×{n}×{k} forward");
                matmul_wt_dense_below(&x, p, (m, n, k), &mut y, true, exact, limit)?;
                let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
                assert!(max_rel(&y, &twice) < 1e-5, "{dtype:?} accumulate");
                // Backward: dx = dy W, i.e. dy (m×n) against Wᵀ (n×k) as a dense reference.
                let dy: Vec<f32> = Tensor::randn(0f32, 1., (m, n), &dev)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut wt_t = vec![0f32; k * n];
                for j in 0..n {
                    for l in 0..k {
                        wt_t[l * n + j] = wd[j * k + l];
                    }
                }
                let want = reference(&dy, &wt_t, (m, k, n));
                let mut dx = vec![1f32; m * k];
                matmul_w_dense_below(
                    &dy,
                    p,
                    (m, n, k),
                    &mut dx,
                    false,
                    MatmulMode::default(),
                    limit,
                )?;
                assert!(max_rel(&dx, &want) < 1e-5, "{dtype:?} {m}×{n}×{k} backward");
                // The quantized-dot path for decoding stays close to the exact one.
                if m <= DOT_ROWS && quant_dot::supported(dtype, k) {
                    let mut yq = vec![0f32; m * n];
                    let int8 = MatmulMode {
                        quantized_dot: true,
                        bf16: false,
                    };
                    matmul_wt(&x, p, (m, n, k), &mut yq, false, int8)?;
                    let want = reference(&x, &wd, (m, n, k));
                    // The activations' 8-bit rounding on unseeded random data: 2e-2 failed once
                    // in CI (Q4_1, 1×7×32); a broken kernel is off by far more.
                    assert!(max_rel(&yq, &want) < 5e-2, "{dtype:?} quantized dot");
                }
            }
        }
        Ok(())
    }

    /// bf16 compute: both products, f32 and packed weights, within bf16 rounding of the exact
    /// ones (skipped where the CPU lacks AVX512-BF16: the mode then runs f32).
    #[test]
    fn bf16_products_stay_within_bf16_rounding() -> Result<()> {
        if !bf16_gemm::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let bf16 = MatmulMode {
            quantized_dot: false,
            bf16: true,
        };
        // The last W packs to more than SHARED_PANELS_BYTES: its input gradient packs tiles
        // per task.
        for (m, n, k) in [(5, 7, 32), (37, 1000, 256), (64, 33, 576), (6, 8200, 1024)] {
            let wt = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let q = QTensor::quantize(&wt, GgmlDType::Q8_0)?;
            let wd: Vec<f32> = q.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let x: Vec<f32> = Tensor::randn(0f32, 1., (m, k), &dev)?
                .flatten_all()?
                .to_vec1()?;
            let dy: Vec<f32> = Tensor::randn(0f32, 1., (m, n), &dev)?
                .flatten_all()?
                .to_vec1()?;
            let mut wt_t = vec![0f32; k * n];
            for j in 0..n {
                for l in 0..k {
                    wt_t[l * n + j] = wd[j * k + l];
                }
            }
            let want_y = reference(&x, &wd, (m, n, k));
            let want_dx = reference(&dy, &wt_t, (m, k, n));
            for w in [WeightRef::F32(&wd), WeightRef::Packed(packed_ref(&q)?)] {
                let mut y = vec![0f32; m * n];
                matmul_wt(&x, w, (m, n, k), &mut y, false, bf16)?;
                assert!(max_rel(&y, &want_y) < 2e-2, "{m}×{n}×{k} forward");
                let mut dx = vec![0f32; m * k];
                matmul_w(&dy, w, (m, n, k), &mut dx, false, bf16)?;
                assert!(max_rel(&dx, &want_dx) < 2e-2, "{m}×{n}×{k} backward");
                // Not the exact path: bf16 rounding shows.
                assert!(max_rel(&y, &want_y) > 1e-6);
                // Panels packed once give the same products, bit for bit.
                let fwd = Bf16Panels::build(w, (n, k), false)?;
                let mut yp = vec![1f32; m * n];
                matmul_wt_panels(&x, &fwd, m, &mut yp, false);
                assert_eq!(yp, y, "{m}×{n}×{k} forward over panels");
                let bwd = Bf16Panels::build(w, (n, k), true)?;
                let mut dxp = vec![0.5f32; m * k];
                matmul_w_panels(&dy, &bwd, m, &mut dxp, true);
                dx.iter_mut().for_each(|v| *v += 0.5);
                assert!(max_rel(&dxp, &dx.iter().map(|&v| v as f64).collect::<Vec<_>>()) < 1e-6);
            }
        }
        Ok(())
    }

    #[test]
    fn f32_weights_take_one_gemm() -> Result<()> {
        let (m, n, k) = (4, 5, 6);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut y = vec![0f32; m * n];
        matmul_wt(
            &x,
            WeightRef::F32(&w),
            (m, n, k),
            &mut y,
            false,
            MatmulMode::default(),
        )?;
        assert!(max_rel(&y, &reference(&x, &w, (m, n, k))) < 1e-6);
        Ok(())
    }
}
