//! The training step's clustering loss as one operation per view on burn's Flex backend.
//!
//! Composed from burn's ops ([`super::loss::head_loss`]), a step scores each view against four
//! centroid sets (two heads, each view's centroids) in eight cross-entropies: eight matrix
//! products of the (N H W) x D pixel rows, a permuted copy of the view to make those rows, and
//! per term a log-softmax, gather, select and weighted sum, each a pass that allocates, and as
//! many again backward. Here a view is scored once against the four sets stacked (one matrix
//! product per image, in the view's own N x D x H x W layout, no permute), the four
//! cross-entropies are reduced row by row, and the gradient is one matrix product back. The backward recomputes the logits
//! rather than keeping them (one more product, no N x K x H x W buffer held between passes).
//! With `model::resample`, this took the training step frozen to stride 16 from 0.22 to 0.145
//! s/image (alternate runs of `cargo bench --bench train`, docs/benchmarks.md).
//!
//! The value and gradient equal the composed loss to float rounding (tested below).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, AutodiffBackend, Backend, Flex};
use burn::tensor::{Int, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::loss::{head_loss, pixels, HeadTargets};
use crate::model::flex_data::{flex, planes};

/// One cross-entropy of the loss: each pixel's label among the centroid rows
/// `offset..offset + k` of the stacked centroids, the classes' balance weights, and the term's
/// weight in the sum.
#[derive(Clone, Debug)]
pub struct CeTerm {
    pub offset: usize,
    pub k: usize,
    /// One per pixel, image by image, row-major within an image (as `pixels` orders them).
    pub labels: Arc<[u16]>,
    pub class_weights: Arc<[f32]>,
    pub coef: f32,
}

/// The terms of one view's loss.
#[derive(Clone, Debug)]
pub struct CeTerms(pub Arc<[CeTerm]>);

#[backend_extension(Flex, Autodiff)]
pub trait ClusterLossBackend: Backend {
    /// sum_t coef_t * CE_t for `z` (N x D x H x W) against `centroids` (K x D): a 1-element tensor.
    /// CE_t = sum_i w[y_i] * -log softmax_k(<z_i, mu_k>)[y_i] / sum_i w[y_i], k over the term's rows.
    fn cluster_loss(z: FloatTensor<Self>, centroids: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self>;
    /// The gradient of [`ClusterLossBackend::cluster_loss`] with respect to `z`, times `dy` (1 element).
    fn cluster_loss_grad(z: FloatTensor<Self>, centroids: FloatTensor<Self>, dy: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self>;
}

/// The view's logits, N x K x (H W): the stacked centroids times each image's D x (H W) features.
fn logits(z: &FlexTensor, centroids: &FlexTensor) -> (Vec<f32>, [usize; 4]) {
    let (z, n, d, hw) = planes(z);
    let c = centroids.to_contiguous();
    let k = c.layout().shape()[0];
    assert_eq!(c.layout().shape()[1], d, "cluster loss: centroids of another width");
    let out = burn_flex::ops::matmul::matmul(c.reshape(Shape::new([1, k, d])), z.reshape(Shape::new([n, d, hw])));
    let out = out.to_contiguous();
    (out.as_slice::<f32>().expect("contiguous").to_vec(), [n, k, d, hw])
}

/// Per pixel of one image: log sum exp over the term's logit rows (`rows`, k x hw).
fn log_sum_exp(rows: &[f32], k: usize, hw: usize, max: &mut [f32], sum: &mut [f32]) {
    max.copy_from_slice(&rows[..hw]);
    for row in rows.chunks_exact(hw).take(k).skip(1) {
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    sum.fill(0.0);
    for row in rows.chunks_exact(hw).take(k) {
        for ((s, &v), &m) in sum.iter_mut().zip(row).zip(max.iter()) {
            *s += (v - m).exp();
        }
    }
    for (s, &m) in sum.iter_mut().zip(max.iter()) {
        *s = m + s.ln();
    }
}

fn check(terms: &CeTerms, n: usize, k: usize, hw: usize) {
    for t in terms.0.iter() {
        assert!(t.offset + t.k <= k && t.k > 0, "cluster loss: term rows past the centroids");
        assert_eq!(t.labels.len(), n * hw, "cluster loss: one label per pixel");
        assert_eq!(t.class_weights.len(), t.k, "cluster loss: one weight per class");
    }
}

/// Each term's weight total, sum_i w[y_i].
fn weight_totals(terms: &CeTerms) -> Vec<f64> {
    terms.0.iter().map(|t| t.labels.iter().map(|&y| t.class_weights[y as usize] as f64).sum()).collect()
}

impl ClusterLossBackend for Flex {
    fn cluster_loss(z: FloatTensor<Self>, centroids: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self> {
        let (logits, [n, k, _, hw]) = logits(&z, &centroids);
        check(&terms, n, k, hw);
        // Per image, each term's weighted sum of -log p(label).
        let sums: Vec<Vec<f64>> = logits
            .par_chunks(k * hw)
            .enumerate()
            .map(|(img, l)| {
                let (mut max, mut lse) = (vec![0f32; hw], vec![0f32; hw]);
                terms
                    .0
                    .iter()
                    .map(|t| {
                        let rows = &l[t.offset * hw..(t.offset + t.k) * hw];
                        log_sum_exp(rows, t.k, hw, &mut max, &mut lse);
                        let labels = &t.labels[img * hw..(img + 1) * hw];
                        (0..hw)
                            .map(|p| t.class_weights[labels[p] as usize] as f64 * (lse[p] - rows[labels[p] as usize * hw + p]) as f64)
                            .sum()
                    })
                    .collect()
            })
            .collect();
        let loss: f64 = weight_totals(&terms)
            .iter()
            .enumerate()
            .map(|(i, &w)| terms.0[i].coef as f64 * sums.iter().map(|s| s[i]).sum::<f64>() / w.max(1e-12))
            .sum();
        flex(vec![loss as f32], vec![1])
    }

    fn cluster_loss_grad(z: FloatTensor<Self>, centroids: FloatTensor<Self>, dy: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self> {
        let dims = z.layout().shape().clone();
        let (mut logits, [n, k, d, hw]) = logits(&z, &centroids);
        check(&terms, n, k, hw);
        let dy = dy.to_contiguous().as_slice::<f32>().expect("contiguous")[0];
        let scales: Vec<f32> =
            weight_totals(&terms).iter().zip(terms.0.iter()).map(|(&w, t)| (dy as f64 * t.coef as f64 / w.max(1e-12)) as f32).collect();
        // d loss / d logit = scale * w[y] * (softmax - onehot(y)), in place of the logits.
        logits.par_chunks_mut(k * hw).enumerate().for_each(|(img, l)| {
            let (mut max, mut lse) = (vec![0f32; hw], vec![0f32; hw]);
            let mut grad = vec![0f32; k * hw];
            for (t, &scale) in terms.0.iter().zip(&scales) {
                let rows = &l[t.offset * hw..(t.offset + t.k) * hw];
                log_sum_exp(rows, t.k, hw, &mut max, &mut lse);
                let labels = &t.labels[img * hw..(img + 1) * hw];
                let a: Vec<f32> = labels.iter().map(|&y| scale * t.class_weights[y as usize]).collect();
                let g = &mut grad[t.offset * hw..(t.offset + t.k) * hw];
                for (g_row, row) in g.chunks_exact_mut(hw).zip(rows.chunks_exact(hw)) {
                    for p in 0..hw {
                        g_row[p] += a[p] * (row[p] - lse[p]).exp();
                    }
                }
                for p in 0..hw {
                    g[labels[p] as usize * hw + p] -= a[p];
                }
            }
            l.copy_from_slice(&grad);
        });
        // dz = mu^T (D x K) times each image's K x (H W) gradient.
        let c = centroids.to_contiguous();
        let cs = c.as_slice::<f32>().expect("contiguous");
        let mut ct = vec![0f32; d * k];
        for (row, mu) in cs.chunks_exact(d).enumerate() {
            for (j, &v) in mu.iter().enumerate() {
                ct[j * k + row] = v;
            }
        }
        let dz = burn_flex::ops::matmul::matmul(flex(ct, vec![1, d, k]), flex(logits, vec![n, k, hw]));
        dz.reshape(dims)
    }
}

#[derive(Debug)]
struct ClusterLossOp;

impl<B: Backend + ClusterLossBackend> Backward<B, 1> for ClusterLossOp {
    /// The view, the centroids and the terms: the backward recomputes the logits.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, CeTerms);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (z, centroids, terms) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| B::cluster_loss_grad(z, centroids, dy, terms));
    }
}

impl<B: Backend + ClusterLossBackend, C: CheckpointStrategy> ClusterLossBackend for Autodiff<B, C> {
    /// Differentiated with respect to `z` only: the centroids are frozen for the epoch.
    fn cluster_loss(z: FloatTensor<Self>, centroids: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self> {
        let (z, node) = z.into_parts();
        let centroids = Self::inner(centroids);
        match ClusterLossOp.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = B::cluster_loss(z.clone(), centroids.clone(), terms.clone());
                prep.finish((z, centroids, terms), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cluster_loss(z, centroids, terms)),
        }
    }

    /// Not differentiated again (no second derivatives are taken in training).
    fn cluster_loss_grad(z: FloatTensor<Self>, centroids: FloatTensor<Self>, dy: FloatTensor<Self>, terms: CeTerms) -> FloatTensor<Self> {
        Self::from_inner(B::cluster_loss_grad(Self::inner(z), Self::inner(centroids), Self::inner(dy), terms))
    }
}

/// One head's frozen targets for an epoch, as plain values: each view's centroids (k x dim,
/// row-major) and balance weights.
#[derive(Clone, Debug)]
pub struct HeadValues {
    pub centroids: [Vec<f32>; 2],
    pub weights: [Vec<f32>; 2],
    pub k: usize,
}

/// The epoch's targets of both heads, ready for either way of computing the loss.
pub struct StepTargets {
    heads: Vec<HeadValues>,
    head_weights: Vec<f32>,
    /// The four centroid sets stacked (head 0 view 0, head 0 view 1, head 1 view 0, ...).
    stacked: Tensor<2>,
    composed: Vec<HeadTargets>,
}

impl StepTargets {
    /// `heads[h]` weighs `head_weights[h]` in the loss.
    pub fn new(heads: Vec<HeadValues>, head_weights: Vec<f32>, dim: usize, device: &burn::tensor::Device) -> Self {
        assert_eq!(heads.len(), head_weights.len());
        let rows: Vec<f32> = heads.iter().flat_map(|h| h.centroids.iter().flatten().copied()).collect();
        let total = rows.len() / dim;
        let stacked = Tensor::<2>::from_data(TensorData::new(rows, [total, dim]), device);
        let composed = heads
            .iter()
            .map(|h| {
                let c = |v: usize| Tensor::<2>::from_data(TensorData::new(h.centroids[v].clone(), [h.k, dim]), device);
                let w = |v: usize| Tensor::<1>::from_data(TensorData::new(h.weights[v].clone(), [h.k]), device);
                HeadTargets { centroids: [c(0), c(1)], weights: [w(0), w(1)] }
            })
            .collect();
        Self { heads, head_weights, stacked, composed }
    }

    /// The step's loss, sum_h head_weights[h] * head_loss(h), of views `z` (each N x D x H x W)
    /// with `labels[h][v]` (view v's labels for head h, one per pixel in `pixels` order). On
    /// Flex one operation per view; elsewhere burn's ops ([`head_loss`]).
    pub fn loss(&self, z: [Tensor<4>; 2], labels: &[[Arc<[u16]>; 2]]) -> Tensor<1> {
        assert_eq!(labels.len(), self.heads.len());
        if !crate::model::on_flex(&z[0].device()) {
            return self.composed_loss(z, labels);
        }
        // Each view is scored against both views' labels and centroids, each CE weighing 1/4 of
        // its head as in head_loss: ((CE11 + CE22) / 2 + (CE12 + CE21) / 2) / 2.
        let mut terms = vec![];
        let mut offset = 0;
        for ((head, l), &w) in self.heads.iter().zip(labels).zip(&self.head_weights) {
            for (view_labels, class_weights) in l.iter().zip(&head.weights) {
                terms.push(CeTerm {
                    offset,
                    k: head.k,
                    labels: view_labels.clone(),
                    class_weights: class_weights.clone().into(),
                    coef: w / 4.0,
                });
                offset += head.k;
            }
        }
        let terms = CeTerms(terms.into());
        let [z1, z2] = z;
        let one = |z: Tensor<4>| {
            Tensor::<1>::from_dispatch(<burn::backend::Dispatch as ClusterLossBackend>::cluster_loss(
                z.into_dispatch(),
                self.stacked.clone().into_dispatch(),
                terms.clone(),
            ))
        };
        one(z1) + one(z2)
    }

    /// The same from burn's ops: [`head_loss`] per head.
    fn composed_loss(&self, z: [Tensor<4>; 2], labels: &[[Arc<[u16]>; 2]]) -> Tensor<1> {
        let device = z[0].device();
        let rows = [pixels(z[0].clone()), pixels(z[1].clone())];
        let int = |l: &Arc<[u16]>| {
            let v: Vec<i64> = l.iter().map(|&y| y as i64).collect();
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device)
        };
        self.composed
            .iter()
            .zip(labels)
            .zip(&self.head_weights)
            .map(|((head, l), &w)| head_loss([&rows[0], &rows[1]], [int(&l[0]), int(&l[1])], head) * w)
            .reduce(|a, b| a + b)
            .expect("at least one head")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::embedder::l2_normalize;
    use burn::tensor::{Device, Distribution};
    use rand::{Rng, SeedableRng};

    /// Two heads (K = 5 and 12) over two views of 3 images of 6 x 7 cells, dim 16; head 1's
    /// view-0 class 3 is empty (weight 0), as the inverse balance gives an empty cluster.
    type Labels = Vec<[Arc<[u16]>; 2]>;

    fn setup(device: &Device) -> (StepTargets, [Tensor<4>; 2], Labels) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let dim = 16;
        let unit = |k: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
            (0..k)
                .flat_map(|_| {
                    let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    v.into_iter().map(move |x| x / n)
                })
                .collect()
        };
        let heads: Vec<HeadValues> = [5usize, 12]
            .iter()
            .enumerate()
            .map(|(h, &k)| {
                let w = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
                    (0..k).map(|c| if h == 1 && c == 3 { 0.0 } else { rng.random_range(0.2..3.0) }).collect()
                };
                HeadValues { centroids: [unit(k, &mut rng), unit(k, &mut rng)], weights: [w(&mut rng), w(&mut rng)], k }
            })
            .collect();
        let (n, cells) = (3, 6 * 7);
        let labels: Vec<[Arc<[u16]>; 2]> = heads
            .iter()
            .enumerate()
            .map(|(h, head)| {
                let mut l = || -> Arc<[u16]> {
                    (0..n * cells)
                        .map(|_| {
                            let y = rng.random_range(0..head.k as u16);
                            if h == 1 && y == 3 {
                                4
                            } else {
                                y
                            }
                        })
                        .collect()
                };
                [l(), l()]
            })
            .collect();
        let z = || l2_normalize(Tensor::<4>::random([n, dim, 6, 7], Distribution::Normal(0.0, 1.0), device));
        (StepTargets::new(heads, vec![0.6, 0.4], dim, device), [z(), z()], labels)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn the_fused_loss_equals_the_composed_one() {
        let (targets, z, labels) = setup(&Device::flex());
        let fused: f32 = targets.loss(z.clone(), &labels).into_scalar();
        let composed: f32 = targets.composed_loss(z, &labels).into_scalar();
        assert!((fused - composed).abs() <= 1e-5 * composed.abs(), "{fused} vs {composed}");
    }

    #[test]
    fn its_gradient_equals_the_composed_ones() {
        let device = Device::flex().autodiff();
        let (targets, z, labels) = setup(&device);
        let grads = |fused: bool| -> Vec<Vec<f32>> {
            let z = [z[0].clone().detach().require_grad(), z[1].clone().detach().require_grad()];
            let loss = if fused { targets.loss(z.clone(), &labels) } else { targets.composed_loss(z.clone(), &labels) };
            // Scaled, so the incoming gradient is not 1.
            let g = (loss * 3.0).backward();
            z.iter().map(|v| values(v.grad(&g).unwrap())).collect()
        };
        let (ours, theirs) = (grads(true), grads(false));
        for (a, b) in ours.iter().zip(&theirs) {
            let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(scale > 0.0);
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "largest difference {worst} of {scale}");
        }
    }

    #[test]
    #[should_panic(expected = "one label per pixel")]
    fn labels_of_another_batch_are_refused() {
        let (targets, z, mut labels) = setup(&Device::flex());
        labels[0][1] = labels[0][1][1..].into();
        let _ = targets.loss(z, &labels);
    }
}
