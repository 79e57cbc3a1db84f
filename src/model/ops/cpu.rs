//! Small helpers shared by the fused CPU kernels: contiguous f32 views of op arguments, and a
//! one-shot op that turns a closure over slices into a tensor (used for hand-written backward
//! passes, which are never differentiated again).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// The f32 data of a contiguous argument.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: argument must be contiguous"),
    }
}

/// Contiguous f32 data of a tensor, copied out (for backward passes).
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// A tensor of `shape` from a freshly computed buffer on `like`'s device.
pub fn from_vec(v: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

/// `Σ aᵢbᵢ` with eight partial sums, so the compiler can keep them in one SIMD register (a
/// single running f32 sum is a serial chain it may not reorder).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows per parallel task so each task has at least ~16k elements of work.
pub fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// A tensor's f32 data for a backward pass: borrowed (the storage stays read-locked while the
/// view lives) when contiguous on the CPU, else a contiguous copy.
pub enum F32View<'a> {
    Borrowed(candle_core::StorageRef<'a>, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl std::ops::Deref for F32View<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32View::Borrowed(s, r) => match &**s {
                candle_core::Storage::Cpu(c) => &c.as_slice::<f32>().unwrap_or_default()[r.clone()],
                _ => &[],
            },
            F32View::Owned(v) => v,
        }
    }
}

/// The f32 data of `t` without a copy where possible (see [`F32View`]).
pub fn view(t: &Tensor) -> Result<F32View<'_>> {
    let (s, l) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(c), Some((a, b))) = (&*s, l.contiguous_offsets()) {
        if c.as_slice::<f32>().is_ok() {
            return Ok(F32View::Borrowed(s, a..b));
        }
    }
    drop(s);
    Ok(F32View::Owned(to_vec(t)?))
}

/// The u32 targets of a cross-entropy op, checked: contiguous, one per row, inside the
/// vocabulary. `op` names the op in the error.
pub fn targets<'a>(
    op: &str,
    ts: &'a CpuStorage,
    tl: &Layout,
    rows: usize,
    vocab: usize,
) -> Result<&'a [u32]> {
    let t = match tl.contiguous_offsets() {
        Some((a, b)) => &ts.as_slice::<u32>()?[a..b],
        None => candle_core::bail!("{op}: targets must be contiguous"),
    };
    if t.len() != rows {
        candle_core::bail!("{op}: {rows} rows but {} targets", t.len());
    }
    if let Some(bad) = t.iter().find(|&&x| x as usize >= vocab) {
        candle_core::bail!("{op}: target {bad} is outside the vocabulary ({vocab})");
    }
    Ok(t)
}

/// A strided matrix operand: `data[i·row_stride + j·col_stride]` is element (i, j), so
/// transposed and interleaved views need no copy.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A [`Mat`] from its fields in order (shorter at the call sites).
pub fn mat(data: &[f32], row_stride: usize, col_stride: usize) -> Mat<'_> {
    Mat {
        data,
        row_stride,
        col_stride,
    }
}

/// A destination that parallel tasks share because each writes a disjoint set of its elements
/// (attention writes each head's rows into one interleaved output). It borrows the buffer
/// mutably for `'a`, so the buffer outlives every task that holds a copy.
#[derive(Clone, Copy)]
pub struct SharedMut<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a `SharedMut` only hands out its pointer through `unsafe` functions whose callers
// promise that concurrent tasks write disjoint elements; sending or sharing the pointer itself
// across threads is then no different from sending `&mut [f32]` split into disjoint parts.
unsafe impl Send for SharedMut<'_> {}
// SAFETY: as for `Send` above.
unsafe impl Sync for SharedMut<'_> {}

impl<'a> SharedMut<'a> {
    pub fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// `buf[start..start + len]` as a slice this task may write.
    ///
    /// # Safety
    /// No other task reads or writes these elements while the slice lives.
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(
            start + len <= self.len,
            "shared buffer: {start}+{len} past its {} elements",
            self.len
        );
        // SAFETY: in bounds (asserted above), the buffer outlives 'a (borrowed by `new`), and
        // the caller guarantees exclusive access to these elements.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

impl SharedMut<'_> {
    /// A pointer to element `start`, for kernels that write a strided region reaching at most
    /// `extent` elements from it.
    ///
    /// # Safety
    /// No other task reads or writes the elements written through the pointer while it is used.
    pub unsafe fn ptr_at(&self, start: usize, extent: usize) -> *mut f32 {
        assert!(
            start + extent <= self.len,
            "shared buffer: {start}+{extent} past its {} elements",
            self.len
        );
        // SAFETY: in bounds (asserted above); the buffer outlives every copy of `self`.
        unsafe { self.ptr.add(start) }
    }
}

/// Elements a (rows × cols) operand with these strides needs: one past its largest index.
fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// Panics unless a (rows × cols) operand with these strides lies inside `len` elements.
fn check(what: &str, len: usize, (rows, cols): (usize, usize), rs: usize, cs: usize) {
    let need = extent(rows, cols, rs, cs);
    assert!(
        need <= len,
        "gemm: {what} is {rows}×{cols} with strides ({rs}, {cs}), which reaches element {} \
         but its slice has only {len}",
        need - 1
    );
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)`, every operand strided (see [`Mat`]).
/// `parallel` spreads one product over the thread pool; kernels that already run one product
/// per task pass false. Panics if an operand's strides reach past its slice.
pub fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [f32], usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallel: bool,
) {
    // SAFETY: `dst` is an exclusive borrow, so no other task touches it and it overlaps
    // neither operand; bounds are asserted inside.
    unsafe {
        gemm_shared(
            (m, n, k),
            (SharedMut::new(dst.0), 0, dst.1, dst.2),
            accumulate,
            lhs,
            rhs,
            beta,
            parallel,
        )
    }
}

/// [`gemm`] into `dst`'s buffer from element `offset` on, for tasks that share one destination.
/// Bounds are asserted as in [`gemm`].
///
/// # Safety
/// While this runs, no other task reads or writes the elements it writes (the m×n extent at
/// `offset` with the given strides), and the operands do not overlap them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_shared(
    (m, n, k): (usize, usize, usize),
    dst: (SharedMut, usize, usize, usize),
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    parallel: bool,
) {
    let (buf, offset, drs, dcs) = dst;
    assert!(
        offset <= buf.len,
        "gemm: dst offset {offset} past {}",
        buf.len
    );
    check("dst", buf.len - offset, (m, n), drs, dcs);
    check(
        "lhs",
        lhs.data.len(),
        (m, k),
        lhs.row_stride,
        lhs.col_stride,
    );
    check(
        "rhs",
        rhs.data.len(),
        (k, n),
        rhs.row_stride,
        rhs.col_stride,
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every index the kernel touches lies inside its operand (checked above: the
    // largest reachable index of each is within its slice, and k = 0 reads nothing), and the
    // caller guarantees the written elements are not accessed concurrently.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            buf.ptr.add(offset),
            dcs as isize,
            drs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm, mat};

    #[test]
    fn gemm_multiplies_strided_views() {
        // [1 2; 3 4] · [5 6; 7 8]ᵀ, the right operand read transposed through its strides.
        let (a, b) = ([1f32, 2., 3., 4.], [5f32, 6., 7., 8.]);
        let mut c = [0f32; 4];
        gemm(
            (2, 2, 2),
            (&mut c, 2, 1),
            false,
            mat(&a, 2, 1),
            mat(&b, 1, 2),
            1.0,
            false,
        );
        assert_eq!(c, [17., 23., 39., 53.]);
    }

    #[test]
    #[should_panic(
        expected = "gemm: rhs is 3×2 with strides (2, 1), which reaches element 5 but its slice has only 5"
    )]
    fn gemm_rejects_a_short_operand() {
        let (a, b) = ([0f32; 6], [0f32; 5]);
        let mut c = [0f32; 4];
        gemm(
            (2, 2, 3),
            (&mut c, 2, 1),
            false,
            mat(&a, 3, 1),
            mat(&b, 2, 1),
            1.0,
            false,
        );
    }

    #[test]
    #[should_panic(expected = "gemm: dst is 2×2")]
    fn gemm_rejects_a_short_destination() {
        let (a, b) = ([0f32; 4], [0f32; 4]);
        let mut c = [0f32; 3];
        gemm(
            (2, 2, 2),
            (&mut c, 2, 1),
            false,
            mat(&a, 2, 1),
            mat(&b, 2, 1),
            1.0,
            false,
        );
    }
}
