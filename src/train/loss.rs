//! The PiCIE clustering loss: cross-entropy over logits -d(z, mu) (cosine distance to frozen
//! centroids), labels = nearest centroid, within each view and across views, with a balance
//! weight per cluster; two heads (K1 and the over-clustering K2) weighted by log K.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::package::Centroids;

/// How each cluster's weight follows from its size n_k (N pixels in all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// w_k = n_k / N, as the authors' code does (large clusters weigh more).
    Frequency,
    /// w_k = N / (K n_k), the usual class balancing (small clusters weigh more).
    Inverse,
    /// Every cluster weighs 1.
    None,
}

impl Balance {
    pub fn weights(self, counts: &[u64]) -> Vec<f32> {
        let total: u64 = counts.iter().sum();
        let k = counts.len() as f32;
        counts
            .iter()
            .map(|&n| match self {
                Balance::Frequency => n as f32 / total.max(1) as f32,
                Balance::Inverse if n == 0 => 0.0,
                Balance::Inverse => total as f32 / (k * n as f32),
                Balance::None => 1.0,
            })
            .collect()
    }
}

/// Pixels as rows: N x D x H x W -> (N H W) x D.
pub fn pixels(z: Tensor<4>) -> Tensor<2> {
    let [_, d, _, _] = z.dims();
    z.permute([0, 2, 3, 1]).reshape([-1, d as i32])
}

/// Weighted cross-entropy over logits -d(z, mu) = <z, mu> - 1 (z and mu unit vectors):
/// sum_i w[y_i] * -log softmax(-d(z_i, .))[y_i] / sum_i w[y_i].
pub fn cluster_loss(z: Tensor<2>, labels: Tensor<1, Int>, centroids: Tensor<2>, class_weights: Tensor<1>) -> Tensor<1> {
    scaled_cluster_loss(z, labels, centroids, class_weights, 1.0)
}

/// [`cluster_loss`] with the logits divided by a temperature: -d(z, mu) / t. Below 1 the
/// softmax sharpens, so a pixel already nearest its target centroid stops pulling.
pub fn scaled_cluster_loss(
    z: Tensor<2>,
    labels: Tensor<1, Int>,
    centroids: Tensor<2>,
    class_weights: Tensor<1>,
    temperature: f32,
) -> Tensor<1> {
    scaled_class_loss(z, labels, &ClassVectors::single(centroids), class_weights, temperature)
}

/// The classes a loss scores against: one unit vector per class, or classes of several (the
/// over-clusters merged into one class, [`Centroids::merged`]) where a pixel's similarity to a
/// class is its best over the class's vectors, as inference scores it
/// ([`crate::infer::assign::ClassScorer`]). Training towards a merged class's mean instead
/// would pull its pixels to a direction between its members that none of them holds.
#[derive(Clone, Debug)]
pub struct ClassVectors {
    /// M x dim unit vectors.
    vectors: Tensor<2>,
    /// Classes of several vectors: the vector in each of a class's slots (K x slots, row-major;
    /// a class of fewer vectors repeats its first), then K and the slots per class.
    slots: Option<(Tensor<1, Int>, usize, usize)>,
}

impl ClassVectors {
    /// One vector per class: K x dim.
    pub fn single(centroids: Tensor<2>) -> Self {
        Self { vectors: centroids, slots: None }
    }

    /// A package's classes, with their members where they were merged.
    pub fn from_centroids(centroids: &Centroids, device: &Device) -> Self {
        let dim = centroids.dim;
        if centroids.over_clusters().is_none() {
            let k = centroids.k();
            return Self::single(Tensor::from_data(TensorData::new(centroids.matrix(), [k, dim]), device));
        }
        let per_class = centroids.classes.iter().map(|c| c.vectors().len()).max().unwrap_or(1);
        let (mut vectors, mut slots) = (vec![], vec![]);
        for class in &centroids.classes {
            let first = vectors.len() / dim;
            let members = class.vectors();
            slots.extend((0..per_class).map(|s| (first + s.min(members.len() - 1)) as i64));
            members.iter().for_each(|v| vectors.extend_from_slice(v));
        }
        let (m, k) = (vectors.len() / dim, centroids.k());
        Self {
            vectors: Tensor::from_data(TensorData::new(vectors, [m, dim]), device),
            slots: Some((Tensor::from_data(TensorData::new(slots, [k * per_class]), device), k, per_class)),
        }
    }

    /// N x K: every row's cosine similarity to every class (rows and vectors unit).
    pub fn similarities(&self, z: Tensor<2>) -> Tensor<2> {
        let sims = z.matmul(self.vectors.clone().transpose());
        match &self.slots {
            None => sims,
            Some((slots, k, per_class)) => {
                let [n, _] = sims.dims();
                sims.select(1, slots.clone()).reshape([n, *k, *per_class]).max_dim(2).reshape([n, *k])
            }
        }
    }
}

/// [`scaled_cluster_loss`] against [`ClassVectors`]: logits (s(z, class) - 1) / t.
pub fn scaled_class_loss(
    z: Tensor<2>,
    labels: Tensor<1, Int>,
    classes: &ClassVectors,
    class_weights: Tensor<1>,
    temperature: f32,
) -> Tensor<1> {
    let [p, _] = z.dims();
    let logits = (classes.similarities(z) - 1.0) / temperature;
    let logp = log_softmax(logits, 1);
    let nll = logp.gather(1, labels.clone().reshape([p as i32, 1])).reshape([p as i32]).neg();
    let w = class_weights.select(0, labels);
    (nll * w.clone()).sum() / w.sum().clamp_min(1e-12)
}

/// Frozen centroids and balance weights of one head for both views.
pub struct HeadTargets {
    pub centroids: [Tensor<2>; 2],
    pub weights: [Tensor<1>; 2],
}

/// ((CE11 + CE22) / 2 + (CE12 + CE21) / 2) / 2 for one head, where CEab scores view a's
/// features against view b's labels and centroids.
pub fn head_loss(z: [&Tensor<2>; 2], labels: [Tensor<1, Int>; 2], head: &HeadTargets) -> Tensor<1> {
    let ce = |a: usize, b: usize| cluster_loss(z[a].clone(), labels[b].clone(), head.centroids[b].clone(), head.weights[b].clone());
    let within = (ce(0, 0) + ce(1, 1)) / 2.0;
    let cross = (ce(0, 1) + ce(1, 0)) / 2.0;
    (within + cross) / 2.0
}

/// The two heads combined as the paper writes it: log K2 / (log K1 + log K2) * L_K1 +
/// log K1 / (log K1 + log K2) * L_K2. Cross-entropy grows with log K; the weights even them out.
pub fn head_weights(k1: usize, k2: usize) -> (f32, f32) {
    let (l1, l2) = ((k1 as f32).ln(), (k2 as f32).ln());
    (l2 / (l1 + l2), l1 / (l1 + l2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::ClassInfo;

    /// Nearest centroid of each row (no gradient).
    fn nearest_labels(z: &Tensor<2>, centroids: &Tensor<2>) -> Tensor<1, Int> {
        z.clone().detach().matmul(centroids.clone().transpose()).argmax(1).flatten(0, 1)
    }

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &Device::flex())
    }

    #[test]
    fn cross_entropy_by_hand() {
        // Two unit centroids on the axes, one pixel on each axis.
        let mu = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let z = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let labels = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &Device::flex());
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 1.0], [2]), &Device::flex());
        // logits for pixel 0: [0, -1]; -log softmax[0] = log(1 + e^-1).
        let expected = (1.0f32 + (-1.0f32).exp()).ln();
        let got: f32 = cluster_loss(z.clone(), labels.clone(), mu.clone(), w).into_scalar();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");

        // Weights: only pixel 1's class counts when class 0 weighs nothing; with wrong labels
        // the loss is log(1 + e^1).
        let w = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 2.0], [2]), &Device::flex());
        let swapped = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 0], [2]), &Device::flex());
        let got: f32 = cluster_loss(z, swapped, mu, w).into_scalar();
        assert!((got - (1.0f32 + 1.0f32.exp()).ln()).abs() < 1e-6, "{got}");
    }

    #[test]
    fn temperature_divides_the_logits() {
        let mu = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let z = t2(vec![1.0, 0.0], [1, 2]);
        let label = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64], [1]), &Device::flex());
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 1.0], [2]), &Device::flex());
        // logits [0, -1] / 0.1 = [0, -10]: -log softmax[0] = log(1 + e^-10).
        let got: f32 = scaled_cluster_loss(z.clone(), label.clone(), mu.clone(), w.clone(), 0.1).into_scalar();
        assert!((got - (1.0f32 + (-10.0f32).exp()).ln()).abs() < 1e-7, "{got}");
        let one: f32 = scaled_cluster_loss(z.clone(), label.clone(), mu.clone(), w.clone(), 1.0).into_scalar();
        assert_eq!(one, cluster_loss(z, label, mu, w).into_scalar::<f32>());
    }

    #[test]
    fn nearest_labels_pick_the_closest_centroid() {
        let mu = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let z = t2(vec![0.9, 0.1, 0.2, 0.8, 0.6, 0.4], [3, 2]);
        let l: Vec<i64> = nearest_labels(&z, &mu).into_data().convert::<i64>().try_to_vec().unwrap();
        assert_eq!(l, vec![0, 1, 0]);
    }

    #[test]
    fn balance_weights_by_hand() {
        assert_eq!(Balance::Frequency.weights(&[1, 3]), vec![0.25, 0.75]);
        assert_eq!(Balance::Inverse.weights(&[1, 3, 0]), vec![4.0 / 3.0, 4.0 / 9.0, 0.0]);
        assert_eq!(Balance::None.weights(&[5, 0]), vec![1.0, 1.0]);
    }

    #[test]
    fn head_weights_follow_log_k() {
        let (a, b) = head_weights(27, 100);
        assert!((a + b - 1.0).abs() < 1e-6);
        assert!((a - 100f32.ln() / (27f32.ln() + 100f32.ln())).abs() < 1e-6);
        assert!(a > b, "the smaller K gets the larger weight");
    }

    #[test]
    fn within_and_cross_terms_are_averaged() {
        // Identical views and centroids: within = cross, so the head loss equals one CE term.
        let mu = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let z = t2(vec![0.8, 0.6, 0.6, 0.8], [2, 2]);
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 1.0], [2]), &Device::flex());
        let head = HeadTargets { centroids: [mu.clone(), mu.clone()], weights: [w.clone(), w.clone()] };
        let l: f32 = head_loss([&z, &z], [nearest_labels(&z, &mu), nearest_labels(&z, &mu)], &head).into_scalar();
        let single: f32 = cluster_loss(z.clone(), nearest_labels(&z, &mu), mu, w).into_scalar();
        assert!((l - single).abs() < 1e-6);
    }

    #[test]
    fn cross_terms_score_each_view_against_the_other_views_labels_and_centroids() {
        let mu1 = t2(vec![1.0, 0.0, 0.0, 1.0], [2, 2]);
        let mu2 = t2(vec![0.6, 0.8, 0.8, -0.6], [2, 2]);
        let z1 = t2(vec![0.8, 0.6, 0.0, 1.0], [2, 2]);
        let z2 = t2(vec![1.0, 0.0, 0.6, 0.8], [2, 2]);
        let y1 = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &Device::flex());
        let y2 = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 1], [2]), &Device::flex());
        let w1 = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 3.0], [2]), &Device::flex());
        let w2 = Tensor::<1>::from_data(TensorData::new(vec![2.0f32, 1.0], [2]), &Device::flex());
        let head = HeadTargets { centroids: [mu1.clone(), mu2.clone()], weights: [w1.clone(), w2.clone()] };
        let got: f32 = head_loss([&z1, &z2], [y1.clone(), y2.clone()], &head).into_scalar();
        let ce = |z: &Tensor<2>, y: &Tensor<1, Int>, mu: &Tensor<2>, w: &Tensor<1>| -> f32 {
            cluster_loss(z.clone(), y.clone(), mu.clone(), w.clone()).into_scalar()
        };
        let within = (ce(&z1, &y1, &mu1, &w1) + ce(&z2, &y2, &mu2, &w2)) / 2.0;
        let cross = (ce(&z1, &y2, &mu2, &w2) + ce(&z2, &y1, &mu1, &w1)) / 2.0;
        assert!((got - (within + cross) / 2.0).abs() < 1e-6, "{got} vs {}", (within + cross) / 2.0);
        // Swapping the views' labels changes the loss: the labels are not recomputed inside.
        let swapped: f32 = head_loss([&z1, &z2], [y2, y1], &head).into_scalar();
        assert!((swapped - got).abs() > 1e-3);
    }

    #[test]
    fn a_merged_class_scores_its_best_member_not_its_mean() {
        // Class 0 holds two members on the x and y axes (mean on the diagonal), class 1 the
        // z axis. A pixel on the x axis is fully in class 0: similarity 1, not the mean's 0.71.
        let info = |centroid: Vec<f32>, members: Vec<Vec<f32>>| ClassInfo { name: None, color: None, centroid, members };
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let centroids = Centroids {
            dim: 3,
            classes: vec![info(vec![h, h, 0.0], vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]]), info(vec![0.0, 0.0, 1.0], vec![])],
        };
        let classes = ClassVectors::from_centroids(&centroids, &Device::flex());
        let z = t2(vec![1.0, 0.0, 0.0, 0.0, 0.6, 0.8], [2, 3]);
        let sims: Vec<f32> = classes.similarities(z.clone()).into_data().convert::<f32>().try_to_vec().unwrap();
        assert_eq!(sims, vec![1.0, 0.0, 0.6, 0.8]);
        // The loss of the x-axis pixel labelled class 0 is that of a pixel on its own centroid.
        let label = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64], [1]), &Device::flex());
        let w = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 1.0], [2]), &Device::flex());
        let x = t2(vec![1.0, 0.0, 0.0], [1, 3]);
        let got: f32 = scaled_class_loss(x.clone(), label.clone(), &classes, w.clone(), 1.0).into_scalar();
        assert!((got - (1.0f32 + (-1.0f32).exp()).ln()).abs() < 1e-6, "{got}");
        // Towards the mean the same pixel sits at similarity 0.71: a loss of log(1 + e^-0.71).
        let to_mean: f32 = cluster_loss(x, label, t2(centroids.matrix(), [2, 3]), w).into_scalar();
        assert!((to_mean - (1.0f32 + (-h).exp()).ln()).abs() < 1e-6, "{to_mean}");
    }

    #[test]
    fn the_gradient_reaches_only_the_best_member() {
        // A pixel between class 0's two members: the gradient of its similarity to class 0
        // follows the nearer member (the max's argument), so it moves towards that one.
        let info = |centroid: Vec<f32>, members: Vec<Vec<f32>>| ClassInfo { name: None, color: None, centroid, members };
        let centroids =
            Centroids { dim: 2, classes: vec![info(vec![0.8, 0.6], vec![vec![1.0, 0.0], vec![0.0, 1.0]]), info(vec![-1.0, 0.0], vec![])] };
        let device = Device::flex().autodiff();
        let classes = ClassVectors::from_centroids(&centroids, &device);
        let z = Tensor::<2>::from_data(TensorData::new(vec![0.8f32, 0.6], [1, 2]), &device).require_grad();
        let s = classes.similarities(z.clone()).slice([0..1, 0..1]).sum();
        let grad: Vec<f32> = z.grad(&s.backward()).unwrap().into_data().convert::<f32>().try_to_vec().unwrap();
        assert_eq!(grad, vec![1.0, 0.0]);
    }
}
