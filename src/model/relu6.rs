//! ReLU6 as one operation with its own gradient, through burn's backend-extension machinery.
//!
//! Composed from burn's ops, `relu(x).clamp_max(6)` costs a comparison, a masked fill and a
//! stored mask forward and another masked fill backward, each a full pass that allocates a
//! tensor; EfficientNet-Lite has a ReLU6 after almost every convolution, so under autodiff that
//! was about a fifth of a training step. Here the forward is one pass (clamp to [0, 6]) and the
//! backward one pass over the saved output and the incoming gradient (the gradient where
//! 0 < output < 6, else 0), as PyTorch's `hardtanh_backward` does.
//!
//! The gradient equals the composed version's wherever x is not exactly 0 or 6; at those two
//! points both ends are flat here (the composed version passes the gradient at x = 6).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Flex};
use burn::tensor::Tensor;

/// The activation's upper bound.
const CAP: f32 = 6.0;

#[backend_extension(Flex, Autodiff)]
pub trait Relu6Backend: Backend {
    /// min(max(x, 0), 6); NaN stays NaN.
    fn relu6(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input gradient of [`Relu6Backend::relu6`] from its output: `grad` where
    /// 0 < output < 6, else 0.
    fn relu6_backward(output: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl Relu6Backend for Flex {
    fn relu6(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // As Flex's own ReLU (NaN passes, -0 becomes 0), then capped.
        burn_flex::ops::unary::unary_op(
            x,
            |v: f32| {
                if v.is_nan() {
                    v
                } else if v > 0.0 {
                    v.min(CAP)
                } else {
                    0.0
                }
            },
            |v: f64| {
                if v.is_nan() {
                    v
                } else if v > 0.0 {
                    v.min(CAP as f64)
                } else {
                    0.0
                }
            },
        )
    }

    fn relu6_backward(output: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        burn_flex::ops::binary::binary_op(
            output,
            grad,
            |out: f32, g| if out > 0.0 && out < CAP { g } else { 0.0 },
            |out: f64, g| if out > 0.0 && out < CAP as f64 { g } else { 0.0 },
            None,
        )
    }
}

#[derive(Debug)]
struct Relu6Op;

impl<B: Backend + Relu6Backend> Backward<B, 1> for Relu6Op {
    /// The forward's output: all the backward needs.
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let output = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::relu6_backward(output, grad));
    }
}

impl<B: Backend + Relu6Backend, C: CheckpointStrategy> Relu6Backend for Autodiff<B, C> {
    fn relu6(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, node) = x.into_parts();
        match Relu6Op.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::relu6(x);
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::relu6(x)),
        }
    }

    /// Not differentiated again (no second derivatives are taken in training).
    fn relu6_backward(output: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::AutodiffBackend;
        Self::from_inner(B::relu6_backward(Self::inner(output), Self::inner(grad)))
    }
}

/// ReLU6 on a tensor of any rank, on the Flex backend with or without autodiff (composed from
/// burn's ops on other backends).
pub fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !super::on_flex(&x.device()) {
        return burn::tensor::activation::relu(x).clamp_max(CAP);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as Relu6Backend>::relu6(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData};

    /// Inputs spread over (-3, 9), none exactly on 0 or 6 (where the two gradients differ by
    /// convention).
    fn input(device: &Device) -> Tensor<4> {
        let x = Tensor::<4>::random([2, 3, 17, 19], Distribution::Uniform(-3.0, 9.0), &Device::flex());
        let v: Vec<f32> = x.into_data().try_to_vec::<f32>().unwrap();
        let v: Vec<f32> = v.into_iter().map(|a| if a == 0.0 || a == CAP { a + 1e-3 } else { a }).collect();
        Tensor::from_data(TensorData::new(v, [2, 3, 17, 19]), device)
    }

    fn reference(x: Tensor<4>) -> Tensor<4> {
        burn::tensor::activation::relu(x).clamp_max(CAP)
    }

    #[test]
    fn forward_matches_the_composed_ops_bit_for_bit() {
        let x = input(&Device::flex());
        assert_eq!(relu6(x.clone()).into_data(), reference(x).into_data());
        // NaN propagates, as the composed version's does.
        let nan = Tensor::<1>::from_floats([f32::NAN, -1.0, 7.0], &Device::flex());
        let out: Vec<f32> = relu6(nan).into_data().try_to_vec::<f32>().unwrap();
        assert!(out[0].is_nan());
        assert_eq!(&out[1..], &[0.0, 6.0]);
    }

    #[test]
    fn gradients_match_the_composed_ops() {
        let device = Device::flex().autodiff();
        let x = input(&device);
        // A weight per element, so the incoming gradient is not all ones.
        let w = Tensor::<4>::random(x.dims(), Distribution::Uniform(-1.0, 1.0), &device);
        let grad_of = |f: fn(Tensor<4>) -> Tensor<4>| {
            let x = x.clone().detach().require_grad();
            let loss = (f(x.clone()) * w.clone()).sum();
            let g: Vec<f32> = x.grad(&loss.backward()).unwrap().into_data().try_to_vec::<f32>().unwrap();
            g
        };
        let (ours, theirs) = (grad_of(relu6), grad_of(reference));
        assert_eq!(ours, theirs);
        // Both bounds are exercised: some gradients pass, some are cut at either end.
        let xs: Vec<f32> = x.into_data().try_to_vec::<f32>().unwrap();
        assert!(xs.iter().zip(&ours).any(|(x, g)| *x < 0.0 && *g == 0.0));
        assert!(xs.iter().zip(&ours).any(|(x, g)| *x > CAP && *g == 0.0));
        assert!(xs.iter().zip(&ours).any(|(x, g)| *x > 0.0 && *x < CAP && *g != 0.0));
    }

    #[test]
    fn a_frozen_input_records_nothing() {
        // Under autodiff with no tracked input (a frozen layer), the op runs untracked.
        let device = Device::flex().autodiff();
        let x = input(&device);
        let y = relu6(x.clone());
        assert!(!y.is_require_grad());
        assert_eq!(y.into_data(), reference(x).into_data());
    }
}
