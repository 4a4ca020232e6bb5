//! The positional embedding resampled to the input's patch grid, exactly as the authors do it.
//!
//! DINO and DINOv2 (`interpolate_pos_encoding`) keep the checkpoint's M x M grid when the
//! input is square and its grid is M x M; otherwise they call
//! `F.interpolate(mode="bicubic", scale_factor=((gh + 0.1) / M, (gw + 0.1) / M))`, without
//! antialiasing (DINOv2's hub models: `interpolate_offset=0.1`, `interpolate_antialias=False`).
//! The 0.1 makes the output size come out as gh x gw despite rounding, and because a scale
//! factor is given, PyTorch maps output pixel i to input coordinate (i + 0.5) / scale - 0.5
//! with that scale, not with the size ratio M / gh: the offset shifts every sample a little,
//! and matching the authors to 1e-4 means matching that too.
//!
//! PyTorch's bicubic is separable (Keys' cubic, a = -0.75, taps outside the grid clamped to
//! its edge), so the resampled grid is Wh . P . Ww^T with one small weight matrix per axis,
//! built here on the host: a product burn differentiates like any other (the embedding is
//! frozen with the rest of the ViT by default, but it need not be). ONNX computes the same
//! with `Resize` (cubic, half_pixel, the scales computed from the input's shape at run time),
//! see [`super::onnx`].

/// Added to the grid size before dividing by M (the authors' `interpolate_offset`).
pub const INTERPOLATE_OFFSET: f64 = 0.1;
/// Keys' cubic convolution parameter, PyTorch's and ONNX Runtime's default for bicubic.
pub const CUBIC_A: f64 = -0.75;

/// Keys' kernel for |x| <= 1.
fn cubic_near(x: f64) -> f64 {
    ((CUBIC_A + 2.0) * x - (CUBIC_A + 3.0)) * x * x + 1.0
}

/// Keys' kernel for 1 < |x| < 2.
fn cubic_far(x: f64) -> f64 {
    ((CUBIC_A * x - 5.0 * CUBIC_A) * x + 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// Whether the authors skip the interpolation: a square input whose grid is the checkpoint's.
pub fn keeps_grid(grid: usize, gh: usize, gw: usize) -> bool {
    gh == grid && gw == grid
}

/// The scale factor the authors pass for an output of `out` cells from `grid`.
pub fn scale_factor(grid: usize, out: usize) -> f64 {
    (out as f64 + INTERPOLATE_OFFSET) / grid as f64
}

/// Row-major `out` x `grid` matrix W with resampled = W . original along one axis, as
/// PyTorch's `upsample_bicubic2d` (align_corners = False) computes it for `scale_factor`.
pub fn bicubic_weights(grid: usize, out: usize, scale_factor: f64) -> Vec<f32> {
    let mut w = vec![0f64; out * grid];
    let step = 1.0 / scale_factor;
    let last = grid as i64 - 1;
    for i in 0..out {
        // No clamping of the coordinate itself for cubic (PyTorch's `cubic = true`).
        let src = step * (i as f64 + 0.5) - 0.5;
        let base = src.floor();
        let t = src - base;
        let coeffs = [cubic_far(t + 1.0), cubic_near(t), cubic_near(1.0 - t), cubic_far(2.0 - t)];
        for (k, c) in coeffs.into_iter().enumerate() {
            let j = (base as i64 - 1 + k as i64).clamp(0, last) as usize;
            w[i * grid + j] += c;
        }
    }
    w.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_sum_to_one_and_an_exact_scale_of_one_is_the_identity() {
        for (grid, out) in [(6, 5), (6, 9), (37, 16), (4, 3)] {
            let w = bicubic_weights(grid, out, scale_factor(grid, out));
            for row in w.chunks(grid) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
            }
        }
        let id = bicubic_weights(5, 5, 1.0);
        for i in 0..5 {
            for j in 0..5 {
                assert!((id[i * 5 + j] - f32::from(i == j)).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn the_offset_shifts_samples_off_the_grid() {
        // At the checkpoint's own grid, the offset's scale (M + 0.1) / M is not 1: this is why
        // the authors' early return matters, and why we keep it.
        let w = bicubic_weights(14, 14, scale_factor(14, 14));
        assert!((w[13 * 14 + 13] - 1.0).abs() > 1e-3);
        assert!(keeps_grid(14, 14, 14) && !keeps_grid(14, 14, 13));
    }
}
