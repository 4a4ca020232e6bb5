//! Batch norm in training mode as per-channel kernels with their own gradient, through burn's
//! backend-extension machinery (as `relu6`).
//!
//! Flex has no batch-norm kernel of its own: burn's default builds the training forward and
//! backward from `swap_dims` copies, means and element-wise passes, about ten full passes over
//! the activation, the largest share of a training step. Here the statistics are two reads of
//! each channel (the mean, then the variance around it), the normalisation one pass, and the
//! backward two: one for the per-channel sums of dy and dy * x_hat, one for the input gradient.
//! Channels (statistics, sums) or planes (element-wise passes) run in parallel.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex};
use burn::nn::BatchNorm;
use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::flex_data::{flex, planes};
use super::lanes;

#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: Backend {
    /// Per-channel mean and biased variance of an N x C x ... tensor, as a 2 x C tensor.
    fn bn_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// (x - mean) / sqrt(var + eps) * gamma + beta, with `stats` from [`Self::bn_stats`];
    /// clamped to [0, 6] in the same pass when `relu6` (ReLU6 fused in).
    fn bn_normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self>;
    /// Per-channel sums of dy and of dy * x_hat, as a 2 x C tensor (the gradients of beta and
    /// gamma). With `relu6`, dy counts only where the forward's `output` was inside (0, 6).
    fn bn_param_grads(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self>;
    /// The input gradient, from the sums of [`Self::bn_param_grads`] (dy masked as there).
    #[allow(clippy::too_many_arguments)]
    fn bn_input_grad(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        sums: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self>;
    /// Row `row` of a 2 x C tensor, as a C tensor.
    fn bn_row(pair: FloatTensor<Self>, row: usize) -> FloatTensor<Self>;
}

fn vector(x: &FlexTensor) -> Vec<f32> {
    x.to_contiguous().as_slice::<f32>().expect("contiguous").to_vec()
}

/// One value per channel, `f(channel)`, channels in parallel.
fn per_channel<T: Send>(c: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    (0..c).into_par_iter().map(f).collect()
}

/// The elements of channel `ch` in sample `s` of an N x C x inner buffer.
fn plane(v: &[f32], c: usize, inner: usize, s: usize, ch: usize) -> &[f32] {
    let start = (s * c + ch) * inner;
    &v[start..start + inner]
}

impl BatchNormBackend for Flex {
    fn bn_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, n, c, inner) = planes(&x);
        let v = x.as_slice::<f32>().expect("contiguous");
        let count = (n * inner) as f64;
        let stats = per_channel(c, |ch| {
            let mean = (0..n).map(|s| lanes::sum(plane(v, c, inner, s, ch)) as f64).sum::<f64>() / count;
            let m = mean as f32;
            let var = (0..n).map(|s| lanes::sum_sq_dev(plane(v, c, inner, s, ch), m) as f64).sum::<f64>() / count;
            (mean as f32, var as f32)
        });
        let (means, vars): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
        flex([means, vars].concat(), vec![2, c])
    }

    fn bn_normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        let (x, _, c, inner) = planes(&x);
        let shape = x.layout().shape().to_vec();
        let v = x.as_slice::<f32>().expect("contiguous");
        let (g, b, st) = (vector(&gamma), vector(&beta), vector(&stats));
        let scale: Vec<f32> = (0..c).map(|ch| g[ch] / (st[c + ch] + epsilon as f32).sqrt()).collect();
        let shift: Vec<f32> = (0..c).map(|ch| b[ch] - st[ch] * scale[ch]).collect();
        let mut out = vec![0f32; v.len()];
        out.par_chunks_mut(inner.max(1)).zip(v.par_chunks(inner.max(1))).enumerate().for_each(|(i, (o, x))| {
            if relu6 {
                lanes::affine_relu6(o, x, scale[i % c], shift[i % c]);
            } else {
                lanes::affine(o, x, scale[i % c], shift[i % c]);
            }
        });
        flex(out, shape)
    }

    fn bn_param_grads(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        let (x, n, c, inner) = planes(&x);
        let (dy, ..) = planes(&dy);
        let (out, ..) = planes(&output);
        let (v, d, y) = (
            x.as_slice::<f32>().expect("contiguous"),
            dy.as_slice::<f32>().expect("contiguous"),
            out.as_slice::<f32>().expect("contiguous"),
        );
        let st = vector(&stats);
        let sums = per_channel(c, |ch| {
            let inv_std = 1.0 / (st[c + ch] as f64 + epsilon).sqrt();
            let m = st[ch];
            let (mut sum_dy, mut sum_dy_xc) = (0f64, 0f64);
            for s in 0..n {
                let (x, d) = (plane(v, c, inner, s, ch), plane(d, c, inner, s, ch));
                let (a, b) =
                    if relu6 { lanes::masked_sums(d, x, plane(y, c, inner, s, ch), m) } else { (lanes::sum(d), lanes::dot_dev(d, x, m)) };
                sum_dy += a as f64;
                sum_dy_xc += b as f64;
            }
            (sum_dy as f32, (sum_dy_xc * inv_std) as f32)
        });
        let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
        flex([dbeta, dgamma].concat(), vec![2, c])
    }

    fn bn_input_grad(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        sums: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        let (x, n, c, inner) = planes(&x);
        let shape = x.layout().shape().to_vec();
        let (dy, ..) = planes(&dy);
        let (out, ..) = planes(&output);
        let y = out.as_slice::<f32>().expect("contiguous");
        let (v, d) = (x.as_slice::<f32>().expect("contiguous"), dy.as_slice::<f32>().expect("contiguous"));
        let (g, st, sm) = (vector(&gamma), vector(&stats), vector(&sums));
        let count = (n * inner) as f32;
        // dx = gamma / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), x_hat = (x - mean) / std:
        // per channel, dx = a * dy + b * x + c0.
        let coef: Vec<(f32, f32, f32)> = (0..c)
            .map(|ch| {
                let inv_std = 1.0 / (st[c + ch] + epsilon as f32).sqrt();
                let k = g[ch] * inv_std;
                let (mean_dy, mean_dy_xhat) = (sm[ch] / count, sm[c + ch] / count);
                let b = -k * mean_dy_xhat * inv_std;
                (k, b, -k * mean_dy - b * st[ch])
            })
            .collect();
        let mut dx = vec![0f32; v.len()];
        let chunk = inner.max(1);
        dx.par_chunks_mut(chunk).zip(v.par_chunks(chunk).zip(d.par_chunks(chunk).zip(y.par_chunks(chunk)))).enumerate().for_each(
            |(i, (o, (x, (d, y))))| {
                let (a, b, c0) = coef[i % c];
                if relu6 {
                    lanes::affine2_masked(o, x, d, y, a, b, c0);
                } else {
                    lanes::affine2(o, x, d, a, b, c0);
                }
            },
        );
        flex(dx, shape)
    }

    fn bn_row(pair: FloatTensor<Self>, row: usize) -> FloatTensor<Self> {
        let v = vector(&pair);
        let c = v.len() / 2;
        flex(v[row * c..(row + 1) * c].to_vec(), vec![c])
    }
}

#[derive(Debug)]
struct BatchNormTrainStep;

impl<B: Backend + BatchNormBackend> Backward<B, 3> for BatchNormTrainStep {
    /// Input, output, gamma, the batch statistics, epsilon and whether ReLU6 is fused in.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, B::FloatTensorPrimitive, f64, bool);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, output, gamma, stats, epsilon, relu6) = ops.state;
        let sums = B::bn_param_grads(x.clone(), output.clone(), stats.clone(), dy.clone(), epsilon, relu6);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::bn_input_grad(x, output, gamma, stats, sums.clone(), dy, epsilon, relu6));
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, B::bn_row(sums.clone(), 1));
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, B::bn_row(sums, 0));
        }
    }
}

impl<B: Backend + BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn bn_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::bn_stats(Self::inner(x)))
    }

    fn bn_normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        let stats = Self::inner(stats);
        let (x, node_x) = x.into_parts();
        let (gamma, node_gamma) = gamma.into_parts();
        let (beta, node_beta) = beta.into_parts();
        match BatchNormTrainStep.prepare::<C>([node_x, node_gamma, node_beta]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::bn_normalize(x.clone(), gamma.clone(), beta, stats.clone(), epsilon, relu6);
                prep.finish((x, output.clone(), gamma, stats, epsilon, relu6), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bn_normalize(x, gamma, beta, stats, epsilon, relu6)),
        }
    }

    fn bn_param_grads(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::bn_param_grads(Self::inner(x), Self::inner(output), Self::inner(stats), Self::inner(dy), epsilon, relu6))
    }

    fn bn_input_grad(
        x: FloatTensor<Self>,
        output: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        sums: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        epsilon: f64,
        relu6: bool,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::bn_input_grad(
            Self::inner(x),
            Self::inner(output),
            Self::inner(gamma),
            Self::inner(stats),
            Self::inner(sums),
            Self::inner(dy),
            epsilon,
            relu6,
        ))
    }

    fn bn_row(pair: FloatTensor<Self>, row: usize) -> FloatTensor<Self> {
        Self::from_inner(B::bn_row(Self::inner(pair), row))
    }
}

/// `bn.forward(x)` in training mode with the fused kernels: normalises with the batch's
/// statistics and moves the running statistics as burn's `BatchNorm` does.
pub fn batch_norm_train(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    normalize_train(bn, x, false)
}

/// `relu6(bn.forward(x))` in training mode as one pass forward and two backward: the clamp
/// happens as the normalised value is written, and the backward masks dy where it reads it,
/// instead of a ReLU6 pass over the whole tensor each way.
pub fn batch_norm_relu6_train(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    normalize_train(bn, x, true)
}

fn normalize_train(bn: &BatchNorm, x: Tensor<4>, relu6: bool) -> Tensor<4> {
    use burn::backend::Dispatch;
    let stats = Tensor::<2>::from_dispatch(<Dispatch as BatchNormBackend>::bn_stats(x.clone().into_dispatch()));
    let output = Tensor::<4>::from_dispatch(<Dispatch as BatchNormBackend>::bn_normalize(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        stats.clone().into_dispatch(),
        bn.epsilon,
        relu6,
    ));
    let [_, c] = stats.dims();
    let row = |i: usize| stats.clone().slice([i..i + 1, 0..c]).reshape([c]).detach();
    let device = output.device();
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    bn.running_mean.update((running_mean.mul_scalar(1.0 - bn.momentum) + row(0).mul_scalar(bn.momentum)).detach());
    bn.running_var.update((running_var.mul_scalar(1.0 - bn.momentum) + row(1).mul_scalar(bn.momentum)).detach());
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Device, Distribution};

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0f32, f32::max);
        assert!(worst < tol, "largest relative difference {worst}");
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn forward_gradients_and_running_statistics_match_burns_batch_norm() {
        let device = Device::flex().autodiff();
        let make_bn = || {
            let mut bn = BatchNormConfig::new(5).with_epsilon(1e-3).init(&device);
            bn.gamma = burn::module::Param::from_tensor(Tensor::<1>::random([5], Distribution::Uniform(0.5, 1.5), &device).require_grad());
            bn.beta = burn::module::Param::from_tensor(Tensor::<1>::random([5], Distribution::Uniform(-0.5, 0.5), &device).require_grad());
            bn
        };
        let reference_bn = make_bn();
        let mut ours_bn = make_bn();
        ours_bn.gamma = reference_bn.gamma.clone();
        ours_bn.beta = reference_bn.beta.clone();
        let x = Tensor::<4>::random([3, 5, 7, 6], Distribution::Normal(0.3, 2.0), &device);
        let w = Tensor::<4>::random([3, 5, 7, 6], Distribution::Uniform(-1.0, 1.0), &device);
        let run = |bn: &BatchNorm, fused: bool| {
            let x = x.clone().detach().require_grad();
            let y = if fused { batch_norm_train(bn, x.clone()) } else { bn.forward(x.clone()) };
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                values(y),
                values(x.grad(&grads).unwrap()),
                values(bn.gamma.val().grad(&grads).unwrap()),
                values(bn.beta.val().grad(&grads).unwrap()),
                values(bn.running_mean.value()),
                values(bn.running_var.value()),
            )
        };
        let theirs = run(&reference_bn, false);
        let ours = run(&ours_bn, true);
        close(&ours.0, &theirs.0, 1e-5);
        close(&ours.1, &theirs.1, 1e-4);
        close(&ours.2, &theirs.2, 1e-4);
        close(&ours.3, &theirs.3, 1e-4);
        close(&ours.4, &theirs.4, 1e-6);
        close(&ours.5, &theirs.5, 1e-6);

        // ReLU6 fused in, against the fused batch norm followed by the separate ReLU6 (whose
        // gradient is itself tested against burn's composed ops).
        let shared_bn = make_bn();
        let run_relu6 = |fused: bool| {
            let bn = shared_bn.clone();
            let x = x.clone().detach().require_grad();
            let y =
                if fused { batch_norm_relu6_train(&bn, x.clone()) } else { super::super::relu6::relu6(batch_norm_train(&bn, x.clone())) };
            let grads = (y.clone() * w.clone()).sum().backward();
            (
                values(y),
                values(x.grad(&grads).unwrap()),
                values(bn.gamma.val().grad(&grads).unwrap()),
                values(bn.beta.val().grad(&grads).unwrap()),
            )
        };
        let (fused, separate) = (run_relu6(true), run_relu6(false));
        assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v > 0.0 && v < 6.0), "both sides of the clamp exercised");
        close(&fused.0, &separate.0, 1e-6);
        close(&fused.1, &separate.1, 1e-4);
        close(&fused.2, &separate.2, 1e-4);
        close(&fused.3, &separate.3, 1e-4);
    }
}
