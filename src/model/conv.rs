//! Depthwise and pointwise convolutions as a training step runs them.
//!
//! burn's default gradients of a convolution are built for the general case, and the two
//! kinds that make up most of EfficientNet-Lite fall off its fast paths:
//! - **Depthwise** (one filter per channel): the weight gradient loops over the groups, one
//!   slice, swap and convolution per channel (up to 1,152 of them per layer), and TF "same"
//!   padding, asymmetric at stride 2, adds a padded copy of the input forward and backward.
//!   Here the forward, the input gradient and the weight gradient are direct per-plane kernels
//!   (a burn backend extension on Flex with its own autodiff step, as `relu6` and
//!   `batchnorm`), with the padding handled by clipping the loops instead of copying.
//! - **Pointwise** (1x1, stride 1, no padding): the weight gradient ran as a convolution whose
//!   kernel is the whole feature map. It is a matrix product per image, and written as one
//!   (`weight [1, Cout, Cin] x input [N, Cin, H*W]`) burn's autodiff takes both gradients as
//!   matrix products too, through Flex's strided gemm.
//!
//! Anything else (the stem, ResNet's 3x3 convolutions) stays on burn's `Conv2d::forward`.

use std::ops::Range;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::flex_data::{flex, planes};
use super::lanes;

/// Where a depthwise convolution reads and writes: square kernel, equal strides, no dilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepthwiseGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl DepthwiseGeometry {
    /// The outputs `o` (of `out`) whose input index `o * stride + tap - pad` falls inside `0..len`.
    fn inside(out: usize, len: usize, stride: usize, tap: usize, pad: usize) -> Range<usize> {
        let lo = if pad > tap { (pad - tap).div_ceil(stride) } else { 0 };
        let hi = if len + pad > tap { ((len - 1 + pad - tap) / stride + 1).min(out) } else { 0 };
        lo.min(hi)..hi
    }

    fn rows(&self, ky: usize) -> Range<usize> {
        Self::inside(self.out_h, self.in_h, self.stride, ky, self.pad_top)
    }

    fn cols(&self, kx: usize) -> Range<usize> {
        Self::inside(self.out_w, self.in_w, self.stride, kx, self.pad_left)
    }

    /// Taps in one filter.
    fn taps(&self) -> usize {
        self.kernel * self.kernel
    }

    /// Every (ky, oy, iy) where filter row `ky` carries input row `iy` into output row `oy`.
    fn row_pairs(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.kernel).flat_map(move |ky| self.rows(ky).map(move |oy| (ky, oy, oy * self.stride + ky - self.pad_top)))
    }

    /// The filter columns that reach any output, each with its reach (the same in every row):
    /// computed once per plane rather than per row.
    fn column_taps(&self) -> Vec<ColumnTap> {
        (0..self.kernel)
            .filter_map(|kx| {
                let cols = self.cols(kx);
                (!cols.is_empty()).then(|| ColumnTap { kx, first: cols.start * self.stride + kx - self.pad_left, cols })
            })
            .collect()
    }
}

/// Filter column `kx` contributes to the outputs `cols` of a row; the first of them reads input
/// column `first`, the rest follow at the stride.
struct ColumnTap {
    kx: usize,
    cols: Range<usize>,
    first: usize,
}

#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseBackend: Backend {
    /// N x C x H x W input, C x 1 x k x k weight: N x C x out_h x out_w.
    fn depthwise_conv(x: FloatTensor<Self>, weight: FloatTensor<Self>, geometry: DepthwiseGeometry) -> FloatTensor<Self>;
    /// The input gradient from the output gradient `dy`.
    fn depthwise_input_grad(dy: FloatTensor<Self>, weight: FloatTensor<Self>, geometry: DepthwiseGeometry) -> FloatTensor<Self>;
    /// The weight gradient (C x 1 x k x k), summed over the batch.
    fn depthwise_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, geometry: DepthwiseGeometry) -> FloatTensor<Self>;
}

/// `out[i] += w * x[i * stride]` over `out`: the inner loop of the forward and the input
/// gradient (contiguous at stride 1, so the compiler vectorises it).
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, x: &[f32], stride: usize) {
    if stride == 1 {
        let n = out.len();
        for (o, &v) in out.iter_mut().zip(&x[..n]) {
            *o += w * v;
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x.iter().step_by(stride)) {
            *o += w * v;
        }
    }
}

// The per-plane kernels, built for AVX2 where the CPU has it (see `lanes`).
lanes::with_avx2!(fn forward_plane(x: &[f32], w: &[f32], out: &mut [f32], g: &DepthwiseGeometry) => forward_plane_body);
lanes::with_avx2!(fn input_grad_plane(dy: &[f32], w: &[f32], dx: &mut [f32], g: &DepthwiseGeometry) => input_grad_plane_body);
lanes::with_avx2!(fn weight_grad_plane(x: &[f32], dy: &[f32], acc: &mut [f64], split: &mut [f32], g: &DepthwiseGeometry) => weight_grad_plane_body);

/// One channel plane of the forward: `out` (out_h x out_w) from `x` (in_h x in_w) and the
/// channel's k x k filter.
#[inline(always)]
fn forward_plane_body(x: &[f32], w: &[f32], out: &mut [f32], g: &DepthwiseGeometry) {
    let taps = g.column_taps();
    for (ky, oy, iy) in g.row_pairs() {
        let x_row = &x[iy * g.in_w..(iy + 1) * g.in_w];
        let out_row = &mut out[oy * g.out_w..(oy + 1) * g.out_w];
        for t in &taps {
            axpy(&mut out_row[t.cols.clone()], w[ky * g.kernel + t.kx], &x_row[t.first..], g.stride);
        }
    }
}

/// Columns of one input row split by phase at stride `s`: phase `p` holds columns p, p + s,
/// p + 2s, ... contiguously, so a tap's strided reads and writes become contiguous ones. At
/// stride 1 the split row is the row itself.
struct Phases {
    stride: usize,
    /// Columns per phase.
    width: usize,
}

impl Phases {
    fn new(g: &DepthwiseGeometry) -> Self {
        Self { stride: g.stride, width: g.in_w.div_ceil(g.stride) }
    }

    fn row_len(&self) -> usize {
        self.stride * self.width
    }

    /// Where input column `col` lives in a split row.
    #[inline(always)]
    fn index(&self, col: usize) -> usize {
        (col % self.stride) * self.width + col / self.stride
    }

    #[inline(always)]
    fn split(&self, row: &[f32], out: &mut [f32]) {
        for (col, &v) in row.iter().enumerate() {
            out[self.index(col)] = v;
        }
    }

    #[inline(always)]
    fn merge(&self, split: &[f32], row: &mut [f32]) {
        for (col, v) in row.iter_mut().enumerate() {
            *v = split[self.index(col)];
        }
    }
}

/// One channel plane of the input gradient: every output's gradient sent back to the inputs
/// it read, weighted by the tap that read them. At stride > 1 it is accumulated in phase-split
/// rows (contiguous writes) and merged back into the plane at the end; at stride 1 that layout
/// is the plane's own, so it is written in place.
#[inline(always)]
fn input_grad_plane_body(dy: &[f32], w: &[f32], dx: &mut [f32], g: &DepthwiseGeometry) {
    let ph = Phases::new(g);
    let taps = g.column_taps();
    let mut split = if g.stride > 1 { vec![0f32; g.in_h * ph.row_len()] } else { vec![] };
    let target: &mut [f32] = if g.stride > 1 { &mut split } else { &mut *dx };
    for (ky, oy, iy) in g.row_pairs() {
        let dy_row = &dy[oy * g.out_w..(oy + 1) * g.out_w];
        let dx_row = &mut target[iy * ph.row_len()..(iy + 1) * ph.row_len()];
        for t in &taps {
            let start = ph.index(t.first);
            axpy(&mut dx_row[start..start + t.cols.len()], w[ky * g.kernel + t.kx], &dy_row[t.cols.clone()], 1);
        }
    }
    if g.stride > 1 {
        for iy in 0..g.in_h {
            ph.merge(&split[iy * ph.row_len()..(iy + 1) * ph.row_len()], &mut dx[iy * g.in_w..(iy + 1) * g.in_w]);
        }
    }
}

/// One channel plane's contribution to its filter's gradient, added to `acc` (k x k): per tap,
/// the sum of output gradient times the input that tap read. At stride > 1 the input rows are
/// read phase-split (`split`, one row of `Phases`), so every product is a contiguous dot.
#[inline(always)]
fn weight_grad_plane_body(x: &[f32], dy: &[f32], acc: &mut [f64], split: &mut [f32], g: &DepthwiseGeometry) {
    let ph = Phases::new(g);
    let taps = g.column_taps();
    for (ky, oy, iy) in g.row_pairs() {
        let x_row = &x[iy * g.in_w..(iy + 1) * g.in_w];
        let x_row = if g.stride == 1 {
            x_row
        } else {
            ph.split(x_row, split);
            &split[..]
        };
        let dy_row = &dy[oy * g.out_w..(oy + 1) * g.out_w];
        for t in &taps {
            let start = ph.index(t.first);
            acc[ky * g.kernel + t.kx] += lanes::dot_body(&dy_row[t.cols.clone()], &x_row[start..start + t.cols.len()]) as f64;
        }
    }
}

/// An N x C x `to` tensor from an N x C x `from` one, plane by plane in parallel: `f(source
/// plane, the channel's filter of `taps`, zeroed destination plane)`.
fn per_plane(
    src: &FlexTensor,
    weight: &FlexTensor,
    from: (usize, usize),
    to: (usize, usize),
    taps: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> FlexTensor {
    let (src, n, c, _) = planes(src);
    let (w, ..) = planes(weight);
    let (ss, ws) = (src.as_slice::<f32>().expect("contiguous"), w.as_slice::<f32>().expect("contiguous"));
    let (plane_in, plane_out) = (from.0 * from.1, to.0 * to.1);
    let mut out = vec![0f32; n * c * plane_out];
    out.par_chunks_mut(plane_out.max(1)).enumerate().for_each(|(i, o)| {
        let ch = i % c;
        f(&ss[i * plane_in..(i + 1) * plane_in], &ws[ch * taps..(ch + 1) * taps], o);
    });
    flex(out, vec![n, c, to.0, to.1])
}

impl DepthwiseBackend for Flex {
    fn depthwise_conv(x: FloatTensor<Self>, weight: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        if g.pad_top == g.pad_bottom && g.pad_left == g.pad_right {
            // Flex's own depthwise forward is faster where it needs no padded copy.
            let c = weight.layout().shape()[0];
            let options = ConvOptions::new([g.stride; 2], [g.pad_top, g.pad_left], [1, 1], c);
            return <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, options);
        }
        per_plane(&x, &weight, (g.in_h, g.in_w), (g.out_h, g.out_w), g.taps(), |x, w, out| forward_plane(x, w, out, &g))
    }

    fn depthwise_input_grad(dy: FloatTensor<Self>, weight: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        per_plane(&dy, &weight, (g.out_h, g.out_w), (g.in_h, g.in_w), g.taps(), |dy, w, dx| input_grad_plane(dy, w, dx, &g))
    }

    fn depthwise_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        let (x, n, c, _) = planes(&x);
        let (dy, ..) = planes(&dy);
        let (xs, ds) = (x.as_slice::<f32>().expect("contiguous"), dy.as_slice::<f32>().expect("contiguous"));
        let (plane_in, plane_out) = (g.in_h * g.in_w, g.out_h * g.out_w);
        let filters: Vec<f32> = (0..c)
            .into_par_iter()
            .flat_map_iter(|ch| {
                let mut acc = vec![0f64; g.taps()];
                let mut split = vec![0f32; Phases::new(&g).row_len()];
                for s in 0..n {
                    let i = s * c + ch;
                    weight_grad_plane(
                        &xs[i * plane_in..(i + 1) * plane_in],
                        &ds[i * plane_out..(i + 1) * plane_out],
                        &mut acc,
                        &mut split,
                        &g,
                    );
                }
                acc.into_iter().map(|v| v as f32)
            })
            .collect();
        flex(filters, vec![c, 1, g.kernel, g.kernel])
    }
}

#[derive(Debug)]
struct DepthwiseStep;

impl<B: Backend + DepthwiseBackend> Backward<B, 2> for DepthwiseStep {
    /// Input, weight and geometry: each gradient needs the other tensor.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, DepthwiseGeometry);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, g) = ops.state;
        if let Some(node) = node_w {
            grads.register::<B>(node.id, B::depthwise_weight_grad(x, dy.clone(), g));
        }
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::depthwise_input_grad(dy, w, g));
        }
    }
}

impl<B: Backend + DepthwiseBackend, C: CheckpointStrategy> DepthwiseBackend for Autodiff<B, C> {
    fn depthwise_conv(x: FloatTensor<Self>, weight: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        let (x, node_x) = x.into_parts();
        let (w, node_w) = weight.into_parts();
        match DepthwiseStep.prepare::<C>([node_x, node_w]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::depthwise_conv(x.clone(), w.clone(), g);
                prep.finish((x, w, g), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::depthwise_conv(x, w, g)),
        }
    }

    /// Not differentiated again (no second derivatives are taken in training).
    fn depthwise_input_grad(dy: FloatTensor<Self>, weight: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_input_grad(Self::inner(dy), Self::inner(weight), g))
    }

    fn depthwise_weight_grad(x: FloatTensor<Self>, dy: FloatTensor<Self>, g: DepthwiseGeometry) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_weight_grad(Self::inner(x), Self::inner(dy), g))
    }
}

/// Padding before and after, per side, as `Conv2d::forward` computes it.
fn padding_pairs(conv: &Conv2d, h: usize, w: usize) -> ((usize, usize), (usize, usize)) {
    let same = |k: usize, s: usize, len: usize| {
        let out = len.div_ceil(s);
        let total = if out > 0 { ((out - 1) * s + k).saturating_sub(len) } else { 0 };
        (total / 2, total - total / 2)
    };
    match conv.padding {
        PaddingConfig2d::Same => (same(conv.kernel_size[0], conv.stride[0], h), same(conv.kernel_size[1], conv.stride[1], w)),
        PaddingConfig2d::Valid => ((0, 0), (0, 0)),
        PaddingConfig2d::Explicit(top, left, bottom, right) => ((top, bottom), (left, right)),
    }
}

/// How `forward` runs a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Depthwise(DepthwiseGeometry),
    Pointwise,
    General,
}

fn kind(conv: &Conv2d, h: usize, w: usize) -> Kind {
    let [c_out, per_group, kh, kw] = conv.weight.dims();
    let ((top, bottom), (left, right)) = padding_pairs(conv, h, w);
    let plain = conv.dilation == [1, 1] && conv.stride[0] == conv.stride[1] && kh == kw;
    if plain && per_group == 1 && conv.groups == c_out && conv.groups > 1 {
        let s = conv.stride[0];
        let out = |len: usize, before: usize, after: usize| (len + before + after).checked_sub(kh).map(|v| v / s + 1);
        if let (Some(out_h), Some(out_w)) = (out(h, top, bottom), out(w, left, right)) {
            // Rows or columns past the last window (at stride > 1 with too little padding) are
            // never read: they count as negative padding, clipped to none.
            let (pad_bottom, pad_right) = (((out_h - 1) * s + kh).saturating_sub(h + top), ((out_w - 1) * s + kh).saturating_sub(w + left));
            return Kind::Depthwise(DepthwiseGeometry {
                kernel: kh,
                stride: s,
                pad_top: top,
                pad_left: left,
                pad_bottom,
                pad_right,
                in_h: h,
                in_w: w,
                out_h,
                out_w,
            });
        }
    }
    if plain && kh == 1 && conv.stride[0] == 1 && conv.groups == 1 && (top, bottom, left, right) == (0, 0, 0, 0) {
        return Kind::Pointwise;
    }
    Kind::General
}

/// `conv.forward(x)`, with depthwise and pointwise convolutions on the kernels above.
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    use burn::backend::Dispatch;
    let [n, c_in, h, w] = x.dims();
    // Without autodiff, Flex's own convolution forward is as fast or faster; other backends
    // have their own kernels.
    if !x.device().is_autodiff() || !super::on_flex(&x.device()) {
        return conv.forward(x);
    }
    let y = match kind(conv, h, w) {
        Kind::Depthwise(g) => Tensor::<4>::from_dispatch(<Dispatch as DepthwiseBackend>::depthwise_conv(
            x.into_dispatch(),
            conv.weight.val().into_dispatch(),
            g,
        )),
        Kind::Pointwise => {
            let [c_out, ..] = conv.weight.dims();
            let weight = conv.weight.val().reshape([1, c_out, c_in]);
            weight.matmul(x.reshape([n, c_in, h * w])).reshape([n, c_out, h, w])
        }
        Kind::General => return conv.forward(x),
    };
    match &conv.bias {
        Some(bias) => {
            let c = bias.dims()[0];
            y + bias.val().reshape([1, c, 1, 1])
        }
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    fn close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
        assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
        let worst = ours.iter().zip(theirs).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
        assert!(worst < tol, "{what}: largest relative difference {worst}");
    }

    /// Output, input gradient and weight (and bias) gradients of `conv` on a random input,
    /// through `forward` here and through burn's `Conv2d::forward`, must agree.
    fn check(conv: Conv2d, input: [usize; 4], expect: Kind) {
        let device = Device::flex().autodiff();
        assert_eq!(kind(&conv, input[2], input[3]), expect, "the path taken");
        let x = Tensor::<4>::random(input, Distribution::Normal(0.0, 1.0), &device);
        // A random weighting of the outputs, so every output's gradient differs.
        let probe = Tensor::<4>::random(conv.forward(x.clone()).dims(), Distribution::Default, &device);
        let run = |ours: bool| {
            let x = x.clone().detach().require_grad();
            let y = if ours { forward(&conv, x.clone()) } else { conv.forward(x.clone()) };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let bias = conv.bias.as_ref().map(|b| values(b.val().grad(&grads).unwrap()));
            (values(y), values(x.grad(&grads).unwrap()), values(conv.weight.val().grad(&grads).unwrap()), bias)
        };
        let ours = run(true);
        let theirs = run(false);
        close(&ours.0, &theirs.0, 1e-5, "output");
        close(&ours.1, &theirs.1, 1e-5, "input gradient");
        close(&ours.2, &theirs.2, 1e-4, "weight gradient");
        assert_eq!(ours.3.is_some(), theirs.3.is_some());
        if let (Some(a), Some(b)) = (ours.3, theirs.3) {
            close(&a, &b, 1e-4, "bias gradient");
        }
    }

    fn depthwise(c: usize, k: usize, stride: usize, padding: PaddingConfig2d) -> Conv2d {
        let device = Device::flex().autodiff();
        Conv2dConfig::new([c, c], [k, k]).with_stride([stride, stride]).with_groups(c).with_padding(padding).with_bias(false).init(&device)
    }

    fn geometry(kernel: usize, stride: usize, pad: (usize, usize, usize, usize), input: (usize, usize), output: (usize, usize)) -> Kind {
        let (pad_top, pad_left, pad_bottom, pad_right) = pad;
        Kind::Depthwise(DepthwiseGeometry {
            kernel,
            stride,
            pad_top,
            pad_left,
            pad_bottom,
            pad_right,
            in_h: input.0,
            in_w: input.1,
            out_h: output.0,
            out_w: output.1,
        })
    }

    #[test]
    fn depthwise_matches_burns_convolution_forward_and_backward() {
        // TF "same" at stride 1 (symmetric) and stride 2 on even and odd sizes (asymmetric: the
        // extra pixel at the bottom and right), 3x3 and 5x5, as EfficientNet-Lite has them.
        check(depthwise(6, 3, 1, PaddingConfig2d::Same), [2, 6, 9, 11], geometry(3, 1, (1, 1, 1, 1), (9, 11), (9, 11)));
        check(depthwise(6, 3, 2, PaddingConfig2d::Same), [2, 6, 10, 12], geometry(3, 2, (0, 0, 1, 1), (10, 12), (5, 6)));
        check(depthwise(4, 5, 2, PaddingConfig2d::Same), [3, 4, 13, 10], geometry(5, 2, (2, 1, 2, 2), (13, 10), (7, 5)));
        check(depthwise(4, 5, 1, PaddingConfig2d::Same), [1, 4, 4, 3], geometry(5, 1, (2, 2, 2, 2), (4, 3), (4, 3)));
        // Explicit and no padding; a row narrower than the kernel's reach; a last row no
        // window reads.
        check(depthwise(3, 3, 1, PaddingConfig2d::Explicit(1, 2, 0, 1)), [2, 3, 7, 8], geometry(3, 1, (1, 2, 0, 1), (7, 8), (6, 9)));
        check(depthwise(3, 3, 2, PaddingConfig2d::Valid), [2, 3, 7, 8], geometry(3, 2, (0, 0, 0, 0), (7, 8), (3, 3)));
        check(depthwise(3, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1)), [1, 3, 5, 2], geometry(3, 1, (1, 1, 1, 1), (5, 2), (5, 2)));
    }

    #[test]
    fn depthwise_with_a_frozen_input_or_weight_records_only_what_is_tracked() {
        let device = Device::flex().autodiff();
        let conv = depthwise(4, 3, 1, PaddingConfig2d::Same);
        let x = Tensor::<4>::random([1, 4, 6, 6], Distribution::Default, &device);
        let grads = forward(&conv, x.clone()).sum().backward();
        assert!(x.grad(&grads).is_none());
        assert!(conv.weight.val().grad(&grads).is_some());
        let frozen = conv.no_grad();
        let x = x.require_grad();
        let grads = forward(&frozen, x.clone()).sum().backward();
        assert!(x.grad(&grads).is_some());
    }

    #[test]
    fn pointwise_matches_burns_convolution_with_and_without_bias() {
        let device = Device::flex().autodiff();
        let plain = Conv2dConfig::new([5, 7], [1, 1]).with_bias(false).init(&device);
        check(plain, [3, 5, 6, 4], Kind::Pointwise);
        let lateral = Conv2dConfig::new([5, 7], [1, 1]).init(&device);
        check(lateral, [2, 5, 3, 3], Kind::Pointwise);
        let same = Conv2dConfig::new([5, 7], [1, 1]).with_padding(PaddingConfig2d::Same).with_bias(false).init(&device);
        check(same, [2, 5, 3, 3], Kind::Pointwise);
    }

    #[test]
    fn other_convolutions_stay_on_burns_path() {
        let device = Device::flex().autodiff();
        let stem = Conv2dConfig::new([3, 8], [3, 3]).with_stride([2, 2]).with_padding(PaddingConfig2d::Same).init(&device);
        check(stem, [2, 3, 9, 9], Kind::General);
        let strided = Conv2dConfig::new([4, 8], [1, 1]).with_stride([2, 2]).init(&device);
        check(strided, [2, 4, 8, 8], Kind::General);
        let grouped = Conv2dConfig::new([4, 8], [3, 3]).with_groups(2).init(&device);
        check(grouped, [1, 4, 5, 5], Kind::General);
    }
}
