//! The guided filter of [`super::guided`] as a small ONNX graph, so that on a GPU the `edges`
//! refinement runs where the network runs (the CUDA execution provider takes every node of it)
//! instead of leaving the GPU idle while the CPU filters. The CPU keeps the Rust filter, which is
//! faster there (running sums instead of pooling windows); both start from the same prepared
//! inputs ([`super::guided::prepare`]) and agree on the labels (tests below).
//!
//! Inputs, one image at a time: `scores`, float32 1 x K x h x w, the class probabilities at the
//! working size; `guide`, uint8 1 x 3 x h x w, the image at the working size; `colours`, uint8
//! 1 x 3 x H x W, the image at the output size. Output `labels`, uint8 1 x H x W. K, h, w, H and
//! W are dynamic; the window radius and eps are fixed when the graph is built.
//!
//! Box means are two average pools (a row window, then a column window) that leave the padding
//! out of the count: the mean over the window clipped at the borders, as the Rust filter takes it.

use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use ndarray::Array4;
use onnx_protobuf::tensor_proto::DataType;
use ort::session::Session;
use ort::value::TensorRef;
use protobuf::Message;

use super::assign::LabelMask;
use super::guided::{planes, prepare, to_original, GuidedConfig, Prepared};
use super::preprocess::Geometry;
use super::session::{open_session, DeviceChoice, GraphSource, Provider};
use crate::model::onnx_graph::{attr_int, attr_ints, attr_string, value_info, Dim, GraphBuilder};

const SCORES: &str = "scores";
const GUIDE: &str = "guide";
const COLOURS: &str = "colours";
const LABELS: &str = "labels";

/// The ONNX graph of the guided filter with `config`'s radius and eps.
pub fn to_onnx_bytes(config: &GuidedConfig) -> Result<Vec<u8>> {
    let r = config.working_radius() as i64;
    let mut g = GraphBuilder::new();
    let mut b = Ops { g: &mut g, r };

    // The guide's colours in [0, 1], their window means and the window covariance (regularised).
    let guide = b.unit_colours(GUIDE);
    let [ir, ig, ib] = b.colour_planes(&guide);
    let mean = b.box_mean(&guide);
    let [mr, mg, mb] = b.colour_planes(&mean);
    let products = [(&ir, &ir), (&ir, &ig), (&ir, &ib), (&ig, &ig), (&ig, &ib), (&ib, &ib)].map(|(x, y)| b.mul(x, y));
    let refs: Vec<&str> = products.iter().map(String::as_str).collect();
    let second = b.g.node("Concat", &refs, vec![attr_int("axis", 1)]);
    let second = b.box_mean(&second);
    let eps = b.g.constant_f32("eps", &[], vec![config.eps]);
    let entry = |b: &mut Ops, i: i64, x: &str, y: &str, diagonal: bool| {
        let m = b.slice_channels(&second, i, i + 1);
        let xy = b.mul(x, y);
        let c = b.sub(&m, &xy);
        if diagonal {
            b.add(&c, &eps)
        } else {
            c
        }
    };
    let xx = entry(&mut b, 0, &mr, &mr, true);
    let xy = entry(&mut b, 1, &mr, &mg, false);
    let xz = entry(&mut b, 2, &mr, &mb, false);
    let yy = entry(&mut b, 3, &mg, &mg, true);
    let yz = entry(&mut b, 4, &mg, &mb, false);
    let zz = entry(&mut b, 5, &mb, &mb, true);
    // The inverse covariance: the adjugate over the determinant (eps keeps it positive).
    let adj = |b: &mut Ops, p: &str, q: &str, s: &str, t: &str| {
        let pq = b.mul(p, q);
        let st = b.mul(s, t);
        b.sub(&pq, &st)
    };
    let a_xx = adj(&mut b, &yy, &zz, &yz, &yz);
    let a_xy = adj(&mut b, &xz, &yz, &xy, &zz);
    let a_xz = adj(&mut b, &xy, &yz, &xz, &yy);
    let a_yy = adj(&mut b, &xx, &zz, &xz, &xz);
    let a_yz = adj(&mut b, &xy, &xz, &xx, &yz);
    let a_zz = adj(&mut b, &xx, &yy, &xy, &xy);
    let det = b.dot3([&xx, &xy, &xz], [&a_xx, &a_xy, &a_xz]);
    let inv_det = b.g.node("Reciprocal", &[&det], vec![]);
    let [i_xx, i_xy, i_xz, i_yy, i_yz, i_zz] = [a_xx, a_xy, a_xz, a_yy, a_yz, a_zz].map(|a| b.mul(&a, &inv_det));

    // Per class (all K at once): the scores' window mean and their covariance with each colour,
    // then the coefficients a (per colour) and b of the local affine model, and their window means.
    let mean_p = b.box_mean(SCORES);
    let cov_with = |b: &mut Ops, colour: &str, colour_mean: &str| {
        let product = b.mul(colour, SCORES);
        let m = b.box_mean(&product);
        let centred = b.mul(colour_mean, &mean_p);
        b.sub(&m, &centred)
    };
    let cr = cov_with(&mut b, &ir, &mr);
    let cg = cov_with(&mut b, &ig, &mg);
    let cb = cov_with(&mut b, &ib, &mb);
    let ar = b.dot3([&i_xx, &i_xy, &i_xz], [&cr, &cg, &cb]);
    let ag = b.dot3([&i_xy, &i_yy, &i_yz], [&cr, &cg, &cb]);
    let ab = b.dot3([&i_xz, &i_yz, &i_zz], [&cr, &cg, &cb]);
    let fitted = b.dot3([&ar, &ag, &ab], [&mr, &mg, &mb]);
    let offset = b.sub(&mean_p, &fitted);
    let coefficients = [ar, ag, ab, offset].map(|c| b.box_mean(&c));

    // Up to the output size (bilinear, half-pixel centres), applied to the colours there.
    let head = b.g.node("Shape", &[SCORES], vec![attr_int("end", 2)]);
    let tail = b.g.node("Shape", &[COLOURS], vec![attr_int("start", 2)]);
    let sizes = b.g.node("Concat", &[&head, &tail], vec![attr_int("axis", 0)]);
    let [ur, ug, ub, uo] = coefficients.map(|c| {
        b.g.node(
            "Resize",
            &[&c, "", "", &sizes],
            vec![attr_string("mode", "linear"), attr_string("coordinate_transformation_mode", "half_pixel")],
        )
    });
    let colours = b.unit_colours(COLOURS);
    let [r, gr, bl] = b.colour_planes(&colours);
    let affine = b.dot3([&ur, &ug, &ub], [&r, &gr, &bl]);
    let q = b.add(&affine, &uo);
    let best = b.g.node("ArgMax", &[&q], vec![attr_int("axis", 1), attr_int("keepdims", 0)]);
    b.g.node("Cast", &[&best], vec![attr_int("to", DataType::UINT8 as i64)]);
    g.rename_last_output(LABELS);

    let inputs = vec![
        value_info(SCORES, DataType::FLOAT, &[Dim::Fixed(1), Dim::Symbol("K"), Dim::Symbol("h"), Dim::Symbol("w")]),
        value_info(GUIDE, DataType::UINT8, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Symbol("h"), Dim::Symbol("w")]),
        value_info(COLOURS, DataType::UINT8, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Symbol("H"), Dim::Symbol("W")]),
    ];
    let outputs = vec![value_info(LABELS, DataType::UINT8, &[Dim::Fixed(1), Dim::Symbol("H"), Dim::Symbol("W")])];
    let doc = format!(
        "picie guided filter (radius {r} at the working size, eps {}): class scores at the working size, \
         guided by the image there, applied to the image at the output size; labels out.",
        config.eps
    );
    g.finish("picie_guided_filter", inputs, outputs, &doc).write_to_bytes().context("serialising the guided-filter graph")
}

/// The nodes the filter is written in, over a builder, with the window radius.
struct Ops<'g> {
    g: &'g mut GraphBuilder,
    r: i64,
}

impl Ops<'_> {
    fn mul(&mut self, x: &str, y: &str) -> String {
        self.g.node("Mul", &[x, y], vec![])
    }

    fn add(&mut self, x: &str, y: &str) -> String {
        self.g.node("Add", &[x, y], vec![])
    }

    fn sub(&mut self, x: &str, y: &str) -> String {
        self.g.node("Sub", &[x, y], vec![])
    }

    /// x0 y0 + x1 y1 + x2 y2, in that order (as the Rust filter sums).
    fn dot3(&mut self, x: [&str; 3], y: [&str; 3]) -> String {
        let p0 = self.mul(x[0], y[0]);
        let p1 = self.mul(x[1], y[1]);
        let p2 = self.mul(x[2], y[2]);
        let s = self.add(&p0, &p1);
        self.add(&s, &p2)
    }

    /// An 8-bit 1 x 3 x h x w image as floats in [0, 1].
    fn unit_colours(&mut self, input: &str) -> String {
        let f = self.g.node("Cast", &[input], vec![attr_int("to", DataType::FLOAT as i64)]);
        let scale = self.g.constant_f32("inv_255", &[], vec![1.0 / 255.0]);
        self.mul(&f, &scale)
    }

    fn slice_channels(&mut self, x: &str, start: i64, end: i64) -> String {
        let starts = self.g.constant_i64("start", vec![start]);
        let ends = self.g.constant_i64("end", vec![end]);
        let axes = self.g.constant_i64("channel_axis", vec![1]);
        self.g.node("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    fn colour_planes(&mut self, x: &str) -> [String; 3] {
        [0, 1, 2].map(|c| self.slice_channels(x, c, c + 1))
    }

    /// The mean over the (2r + 1)^2 window around every pixel, clipped at the borders: a row
    /// window then a column window, the padding left out of each count.
    fn box_mean(&mut self, x: &str) -> String {
        let (r, k) = (self.r, 2 * self.r + 1);
        let pool = |kernel: [i64; 2], pads: [i64; 4]| {
            vec![attr_ints("kernel_shape", &kernel), attr_ints("pads", &pads), attr_int("count_include_pad", 0)]
        };
        let rows = self.g.node("AveragePool", &[x], pool([1, k], [0, r, 0, r]));
        self.g.node("AveragePool", &[&rows], pool([k, 1], [r, 0, r, 0]))
    }
}

/// An ONNX Runtime session on the guided-filter graph for one configuration.
pub struct GuidedGraph {
    session: Mutex<Session>,
    provider: Provider,
    config: GuidedConfig,
}

impl GuidedGraph {
    pub fn load(config: GuidedConfig, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let bytes = to_onnx_bytes(&config)?;
        let (session, provider) = open_session(GraphSource::Bytes(&bytes), device, threads, "guided-filter graph")?;
        tracing::info!(provider = provider.as_str(), "guided-filter graph ready");
        Ok(Self { session: Mutex::new(session), provider, config })
    }

    pub fn config(&self) -> &GuidedConfig {
        &self.config
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The labels [`super::guided::labels_guided`] gives for the same inputs, filtered by the graph.
    pub fn labels(&self, scores: &[f32], k: usize, feat: (usize, usize), geom: &Geometry, image: &RgbImage) -> Result<LabelMask> {
        let Prepared { work: (ww, wh), scores: interleaved, guide, target, .. } = prepare(scores, k, feat, geom, image, &self.config);
        let scores = Array4::from_shape_vec((1, k, wh, ww), planes(&interleaved, k, ww * wh))?;
        let guide = channels_first(&guide)?;
        let colours = channels_first(&target)?;
        let (tw, th) = (target.width() as usize, target.height() as usize);
        let input_error = |e: ort::Error| anyhow!("guided-filter input: {e}");
        let scores_in = TensorRef::from_array_view(scores.view()).map_err(input_error)?;
        let guide_in = TensorRef::from_array_view(guide.view()).map_err(input_error)?;
        let colours_in = TensorRef::from_array_view(colours.view()).map_err(input_error)?;
        let mut session = self.session.lock().map_err(|_| anyhow!("guided-filter session poisoned"))?;
        let outputs = session
            .run(ort::inputs![SCORES => scores_in, GUIDE => guide_in, COLOURS => colours_in])
            .map_err(|e| anyhow!("guided-filter graph failed: {e}"))?;
        let labels = outputs[LABELS].try_extract_array::<u8>().context("reading the guided filter's labels")?;
        if labels.shape() != [1, th, tw] {
            return Err(anyhow!("guided-filter labels are {:?}, expected [1, {th}, {tw}]", labels.shape()));
        }
        let labels: Vec<u8> = labels.iter().copied().collect();
        Ok(to_original(labels, (tw, th), (geom.original.0 as usize, geom.original.1 as usize)))
    }
}

/// An RGB image as a 1 x 3 x h x w array.
fn channels_first(image: &RgbImage) -> Result<Array4<u8>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = vec![0u8; 3 * w * h];
    let (r, rest) = out.split_at_mut(w * h);
    let (g, b) = rest.split_at_mut(w * h);
    for (i, p) in image.pixels().enumerate() {
        r[i] = p[0];
        g[i] = p[1];
        b[i] = p[2];
    }
    Ok(Array4::from_shape_vec((1, 3, h, w), out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::guided::labels_guided;

    /// A scene with a few regions and soft, misplaced class scores: the graph and the Rust filter
    /// give the same labels (up to pixels where two classes tie within float rounding).
    fn agreement(config: GuidedConfig, (ow, oh): (u32, u32), resized: (u32, u32)) -> f64 {
        let image = RgbImage::from_fn(ow, oh, |x, y| {
            // Six regions of distinct colours, with a little texture.
            let band = 3 * x / ow + 3 * (2 * y / oh);
            let noise = (x * 7919 + y * 104729) % 23;
            image::Rgb([(20 + 35 * band + noise) as u8, (210 - 30 * band + noise) as u8, (60 + (band % 2) * 120 + noise) as u8])
        });
        let (k, fw, fh) = (4, (resized.0 as usize).div_ceil(32) * 8, (resized.1 as usize).div_ceil(32) * 8);
        let scores: Vec<f32> = (0..k * fw * fh)
            .map(|i| {
                let (c, p) = (i / (fw * fh), i % (fw * fh));
                let (x, y) = ((p % fw) as f32 / fw as f32, (p / fw) as f32 / fh as f32);
                ((c as f32 + 1.0) * 2.1 * x + (c as f32) * 1.3 * y + (c * p % 7) as f32 * 0.01).sin()
            })
            .collect();
        let geom = Geometry { original: (ow, oh), resized, padded: ((fw * 4) as u32, (fh * 4) as u32) };
        let rust = labels_guided(&scores, k, (fw, fh), &geom, &image, &config);
        let graph = GuidedGraph::load(config, DeviceChoice::Cpu, Some(1)).unwrap();
        let onnx = graph.labels(&scores, k, (fw, fh), &geom, &image).unwrap();
        assert_eq!((onnx.width, onnx.height), (rust.width, rust.height));
        // The filter must have work to do here: several classes, and boundaries it moves.
        let plain = crate::infer::assign::labels_at_original_size(&scores, k, (fw, fh), &geom);
        assert!(rust.class_counts(k).iter().filter(|&&c| c > 0).count() >= 3, "{:?}", rust.class_counts(k));
        let moved = plain.labels.iter().zip(&rust.labels).filter(|(a, b)| a != b).count();
        assert!(moved > rust.labels.len() / 100, "the filter moved {moved} labels");
        let same = onnx.labels.iter().zip(&rust.labels).filter(|(a, b)| a == b).count();
        let share = same as f64 / rust.labels.len() as f64;
        eprintln!("{k} classes {:?}, filter moved {moved} labels, graph and Rust agree on {share:.5}", rust.class_counts(k));
        share
    }

    #[test]
    fn the_graph_gives_the_rust_filters_labels() {
        let default = GuidedConfig::default();
        let share = agreement(default, (240, 180), (240, 180));
        assert!(share > 0.999, "labels agree on {:.4} of the pixels", share);
        // Raw scores (no softmax), the filter at the network's resolution.
        let raw = GuidedConfig { temperature: 0.0, scale: 1.0, radius: 8.0, ..default };
        let share = agreement(raw, (120, 90), (120, 90));
        assert!(share > 0.999, "labels agree on {:.4} of the pixels", share);
    }

    #[test]
    fn a_large_image_gets_labels_at_its_own_size() {
        // Labels are made at most at max_output_pixels and scaled up, as the Rust filter does.
        let config = GuidedConfig { max_output_pixels: 20_000, ..GuidedConfig::default() };
        let share = agreement(config, (400, 300), (160, 120));
        assert!(share > 0.999, "labels agree on {:.4} of the pixels", share);
    }
}
