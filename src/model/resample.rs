//! Bilinear resampling (half-pixel, align_corners = false) as one operation with its own
//! gradient: the FPN's top-down upsampling, and the geometric transform G of a training step
//! (each image's crop box resized back to the full frame, flipped when drawn).
//!
//! Composed from burn's ops, G on the feature map was a slice, an `interpolate`, a flip and a
//! concatenation per image; backward each slice's gradient is a zeroed full-size tensor with the
//! crop written into it, and burn's bilinear kernels compute the source coordinates per output
//! element (a libm `floor` each). Here each output row and column's two sources and weight are
//! computed once per image, the forward blends two input rows then gathers columns, and the
//! backward scatters into one gradient tensor the size of the input, plane by plane in parallel.
//! That alone took the training step frozen to stride 16 from 0.33 to 0.25 s/image (alternate
//! runs of `cargo bench --bench train`, docs/benchmarks.md).
//!
//! Results equal burn's `interpolate` (bilinear, half-pixel) of the crop to float rounding;
//! tested below against the composed ops, forward and gradients.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;
use rayon::prelude::*;

use burn_flex::FlexTensor;

use super::flex_data::{flex, planes};

/// The region of one image that is resampled: rows `y0..y0 + h`, columns `x0..x0 + w`, the
/// result mirrored left to right when `flip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub y0: usize,
    pub x0: usize,
    pub h: usize,
    pub w: usize,
    pub flip: bool,
}

impl Window {
    /// All of an `h` x `w` image, unflipped.
    pub fn whole([h, w]: [usize; 2]) -> Self {
        Self { y0: 0, x0: 0, h, w, flip: false }
    }
}

/// One resampling of an N x C x H x W tensor: a window per image, every window resized to
/// `output`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resampling {
    pub input: [usize; 2],
    pub output: [usize; 2],
    pub windows: Arc<[Window]>,
}

impl Resampling {
    fn check(&self, dims: [usize; 4]) {
        let [n, _, h, w] = dims;
        assert_eq!([h, w], self.input, "resample: the tensor is not the planned size");
        assert_eq!(n, self.windows.len(), "resample: one window per image");
        assert!(self.output[0] > 0 && self.output[1] > 0, "resample: empty output");
        for win in self.windows.iter() {
            assert!(win.h > 0 && win.w > 0 && win.y0 + win.h <= h && win.x0 + win.w <= w, "resample: {win:?} outside {h} x {w}");
        }
    }
}

/// One output coordinate: its two source coordinates and the weight of the second, as burn's
/// bilinear kernel computes them (source = (o + 0.5) * in / out - 0.5, clamped at 0).
#[derive(Clone, Copy, Debug)]
struct Tap {
    lo: usize,
    hi: usize,
    w: f32,
}

/// The taps of `len_out` outputs reading `len_in` inputs from `start`; reversed when `flip`.
fn taps(start: usize, len_in: usize, len_out: usize, flip: bool) -> Vec<Tap> {
    let ratio = len_in as f64 / len_out as f64;
    let mut taps: Vec<Tap> = (0..len_out)
        .map(|o| {
            let src = (o as f64 + 0.5) * ratio - 0.5;
            let lo = (src.floor().max(0.0) as usize).min(len_in - 1);
            let hi = (lo + 1).min(len_in - 1);
            Tap { lo: start + lo, hi: start + hi, w: (src - lo as f64).max(0.0) as f32 }
        })
        .collect();
    if flip {
        taps.reverse();
    }
    taps
}

/// Each image's row and column taps.
fn image_taps(r: &Resampling) -> Vec<(Vec<Tap>, Vec<Tap>)> {
    r.windows.iter().map(|win| (taps(win.y0, win.h, r.output[0], false), taps(win.x0, win.w, r.output[1], win.flip))).collect()
}

/// One plane of the forward: per output row, the two source rows blended over the window's
/// columns, then each output column's two columns of that blend.
fn forward_plane(x: &[f32], in_w: usize, rows: &[Tap], cols: &[Tap], span: (usize, usize), blend: &mut [f32], out: &mut [f32]) {
    let (c0, c1) = span;
    let width = cols.len();
    for (r, out_row) in rows.iter().zip(out.chunks_exact_mut(width)) {
        let (a, b) = (&x[r.lo * in_w + c0..r.lo * in_w + c1], &x[r.hi * in_w + c0..r.hi * in_w + c1]);
        for ((v, &a), &b) in blend.iter_mut().zip(a).zip(b) {
            *v = a * (1.0 - r.w) + b * r.w;
        }
        for (o, c) in out_row.iter_mut().zip(cols) {
            *o = blend[c.lo - c0] * (1.0 - c.w) + blend[c.hi - c0] * c.w;
        }
    }
}

/// One plane of the input gradient: each output row's gradient scattered to its two columns,
/// then that row added to its two source rows.
fn grad_plane(dy: &[f32], in_w: usize, rows: &[Tap], cols: &[Tap], span: (usize, usize), scatter: &mut [f32], dx: &mut [f32]) {
    let (c0, c1) = span;
    let width = cols.len();
    for (r, dy_row) in rows.iter().zip(dy.chunks_exact(width)) {
        scatter.fill(0.0);
        for (&g, c) in dy_row.iter().zip(cols) {
            scatter[c.lo - c0] += g * (1.0 - c.w);
            scatter[c.hi - c0] += g * c.w;
        }
        for (d, &s) in dx[r.lo * in_w + c0..r.lo * in_w + c1].iter_mut().zip(scatter.iter()) {
            *d += s * (1.0 - r.w);
        }
        for (d, &s) in dx[r.hi * in_w + c0..r.hi * in_w + c1].iter_mut().zip(scatter.iter()) {
            *d += s * r.w;
        }
    }
}

/// The columns a window's taps read.
fn span(win: &Window) -> (usize, usize) {
    (win.x0, win.x0 + win.w)
}

#[backend_extension(Flex, Autodiff)]
pub trait ResampleBackend: Backend {
    /// N x C x input -> N x C x output, each image's window resampled.
    fn resample(x: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self>;
    /// The input gradient (N x C x input) from the output gradient.
    fn resample_grad(dy: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self>;
}

/// An N x C x `to` tensor from the N x C x `from` tensor `src`, plane by plane in parallel:
/// `f(source plane, the image's row and column taps, its window, scratch row, zeroed destination
/// plane)`. Checks `src` and the plan against each other first.
fn per_plane(
    src: &FlexTensor,
    plan: &Resampling,
    from: [usize; 2],
    to: [usize; 2],
    f: impl Fn(&[f32], &(Vec<Tap>, Vec<Tap>), &Window, &mut Vec<f32>, &mut [f32]) + Sync,
) -> FlexTensor {
    let shape = src.layout().shape().clone();
    let (src, n, c, _) = planes(src);
    assert_eq!([shape[2], shape[3]], from, "resample: the tensor is not the planned size");
    plan.check([n, c, plan.input[0], plan.input[1]]);
    let ss = src.as_slice::<f32>().expect("contiguous");
    let taps = image_taps(plan);
    let (plane_in, plane_out) = (from[0] * from[1], to[0] * to[1]);
    let mut out = vec![0f32; n * c * plane_out];
    out.par_chunks_mut(plane_out).enumerate().for_each_init(Vec::new, |scratch, (i, o)| {
        let win = &plan.windows[i / c];
        scratch.resize(win.w, 0.0);
        f(&ss[i * plane_in..(i + 1) * plane_in], &taps[i / c], win, scratch, o);
    });
    flex(out, vec![n, c, to[0], to[1]])
}

impl ResampleBackend for Flex {
    fn resample(x: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self> {
        let in_w = plan.input[1];
        per_plane(&x, &plan, plan.input, plan.output, |x, (rows, cols), win, blend, out| {
            forward_plane(x, in_w, rows, cols, span(win), blend, out)
        })
    }

    fn resample_grad(dy: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self> {
        let in_w = plan.input[1];
        per_plane(&dy, &plan, plan.output, plan.input, |dy, (rows, cols), win, scatter, dx| {
            grad_plane(dy, in_w, rows, cols, span(win), scatter, dx)
        })
    }
}

#[derive(Debug)]
struct ResampleOp;

impl<B: Backend + ResampleBackend> Backward<B, 1> for ResampleOp {
    /// The plan: the gradient needs no tensor of the forward.
    type State = Resampling;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let plan = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| B::resample_grad(dy, plan));
    }
}

impl<B: Backend + ResampleBackend, C: CheckpointStrategy> ResampleBackend for Autodiff<B, C> {
    fn resample(x: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self> {
        let (x, node) = x.into_parts();
        match ResampleOp.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::resample(x, plan.clone());
                prep.finish(plan, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::resample(x, plan)),
        }
    }

    /// Not differentiated again (no second derivatives are taken in training).
    fn resample_grad(dy: FloatTensor<Self>, plan: Resampling) -> FloatTensor<Self> {
        Self::from_inner(B::resample_grad(Self::inner(dy), plan))
    }
}

/// Each image's `window` of `x` (N x C x H x W) resized bilinearly (half-pixel) to `size`, and
/// mirrored where its window says. On Flex (with or without autodiff) one operation; elsewhere
/// burn's slice, `interpolate`, flip and concatenation.
pub fn resample(x: Tensor<4>, windows: &[Window], size: [usize; 2]) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if !super::on_flex(&x.device()) {
        return composed(x, windows, size);
    }
    let plan = Resampling { input: [h, w], output: size, windows: windows.into() };
    Tensor::from_dispatch(<burn::backend::Dispatch as ResampleBackend>::resample(x.into_dispatch(), plan))
}

/// Every image of `x` resized bilinearly (half-pixel) to `size`: burn's `interpolate`, as one
/// operation on Flex.
pub fn resize(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [n, _, h, w] = x.dims();
    resample(x, &vec![Window::whole([h, w]); n], size)
}

/// The same from burn's own operations (other backends, and the reference in tests).
fn composed(x: Tensor<4>, windows: &[Window], size: [usize; 2]) -> Tensor<4> {
    let [n, c, ..] = x.dims();
    assert_eq!(n, windows.len(), "resample: one window per image");
    let parts: Vec<Tensor<4>> = windows
        .iter()
        .enumerate()
        .map(|(i, win)| {
            let mut t = x.clone().slice([i..i + 1, 0..c, win.y0..win.y0 + win.h, win.x0..win.x0 + win.w]);
            if [win.h, win.w] != size {
                t = interpolate(t, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size(size));
            }
            if win.flip {
                t = t.flip([3]);
            }
            t
        })
        .collect();
    Tensor::cat(parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Equal within `tol` relative to the largest magnitude (at least 1): a gradient sums many
    /// terms of random inputs, and two orders of summation differ by rounding in proportion.
    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale, "{what}: largest difference {worst}, largest value {scale}");
    }

    /// Windows that cover the cases: the whole image, a crop smaller than the output (upsampling),
    /// a crop of the output's size (a plain copy), flips, a one-pixel-wide crop, a crop at the far
    /// corner.
    fn cases() -> Vec<([usize; 2], [usize; 2], Vec<Window>)> {
        let win = |y0, x0, h, w, flip| Window { y0, x0, h, w, flip };
        vec![
            ([10, 12], [20, 24], vec![Window::whole([10, 12]); 3]),
            ([5, 3], [20, 12], vec![Window::whole([5, 3]); 2]),
            (
                [20, 24],
                [20, 24],
                vec![win(2, 3, 11, 14, true), win(0, 0, 20, 24, false), win(9, 0, 11, 24, true), win(0, 5, 20, 19, false)],
            ),
            ([20, 24], [20, 24], vec![win(4, 7, 7, 1, false), win(19, 23, 1, 1, true), win(3, 2, 20 - 3, 24 - 2, true)]),
            ([16, 16], [9, 7], vec![win(1, 2, 13, 11, false), Window::whole([16, 16])]),
        ]
    }

    #[test]
    fn forward_equals_the_composed_ops() {
        let device = Device::flex();
        for (input, output, windows) in cases() {
            let x = Tensor::<4>::random([windows.len(), 3, input[0], input[1]], Distribution::Normal(0.0, 1.0), &device);
            let ours = values(resample(x.clone(), &windows, output));
            let theirs = values(composed(x, &windows, output));
            assert_close(&ours, &theirs, 1e-5, &format!("{input:?} -> {output:?}"));
        }
    }

    #[test]
    fn gradients_equal_the_composed_ops() {
        let device = Device::flex().autodiff();
        for (input, output, windows) in cases() {
            let n = windows.len();
            let x = Tensor::<4>::random([n, 3, input[0], input[1]], Distribution::Normal(0.0, 1.0), &device);
            // A weight per output element, so the incoming gradient is not uniform.
            let w = Tensor::<4>::random([n, 3, output[0], output[1]], Distribution::Uniform(-1.0, 1.0), &device);
            let grad = |f: &dyn Fn(Tensor<4>) -> Tensor<4>| {
                let x = x.clone().detach().require_grad();
                let loss = (f(x.clone()) * w.clone()).sum();
                values(x.grad(&loss.backward()).unwrap())
            };
            let ours = grad(&|x| resample(x, &windows, output));
            let theirs = grad(&|x| composed(x, &windows, output));
            assert_close(&ours, &theirs, 1e-5, &format!("gradient {input:?} -> {output:?}"));
            assert!(ours.iter().any(|&g| g != 0.0), "a gradient of zeros proves nothing");
        }
    }

    #[test]
    fn resize_equals_interpolate_and_a_frozen_input_records_nothing() {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([2, 4, 7, 9], Distribution::Normal(0.0, 1.0), &device);
        let y = resize(x.clone(), [28, 36]);
        assert!(!y.is_require_grad());
        let reference =
            interpolate(x, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([28, 36]));
        assert_close(&values(y), &values(reference), 1e-5, "resize");
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_window_past_the_edge_is_refused() {
        let x = Tensor::<4>::zeros([1, 1, 4, 4], &Device::flex());
        resample(x, &[Window { y0: 2, x0: 0, h: 3, w: 4, flip: false }], [4, 4]);
    }
}
