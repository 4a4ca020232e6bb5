//! Loops the compiler vectorises, compiled twice: for the baseline x86-64 (SSE2, four floats per
//! instruction) and for AVX2 (eight), chosen at run time by what the CPU has (`with_avx2!`).
//!
//! Reductions: a plain `iter().sum()` over f32 is one serial chain (float addition is not
//! reassociated), so it runs one element at a time; sixteen independent partial sums fill the
//! vector registers instead. The order of additions differs from a serial sum, within float
//! rounding.

const LANES: usize = 16;

/// `fn name(args) -> ret => body`: defines `name`, which runs `body` (an `#[inline(always)]`
/// function, so it is compiled into each caller) built for AVX2 where the CPU has it and for
/// the baseline otherwise. Use it on functions called per row or plane, not per element.
macro_rules! with_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use with_avx2;

/// Sum of `f(a[i], b[i])` over the shorter of the two slices.
#[inline(always)]
fn fold2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `f(a[i])`.
#[inline(always)]
fn fold1(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let tail: f32 = ca.remainder().iter().map(|&x| f(x)).sum();
    for x in ca {
        for i in 0..LANES {
            acc[i] += f(x[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum_body(a: &[f32]) -> f32 {
    fold1(a, |x| x)
}

#[inline(always)]
fn sum_sq_dev_body(a: &[f32], mean: f32) -> f32 {
    fold1(a, |x| (x - mean) * (x - mean))
}

#[inline(always)]
pub(crate) fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    fold2(a, b, |x, y| x * y)
}

#[inline(always)]
fn dot_dev_body(d: &[f32], x: &[f32], mean: f32) -> f32 {
    fold2(d, x, |g, v| g * (v - mean))
}

#[inline(always)]
fn affine_body(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * scale + shift;
    }
}

#[inline(always)]
fn affine2_body(out: &mut [f32], x: &[f32], d: &[f32], a: f32, b: f32, c: f32) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(d) {
        *o = a * g + b * v + c;
    }
}

#[inline(always)]
fn affine_relu6_body(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * scale + shift).clamp(0.0, RELU6_CAP);
    }
}

/// Whether ReLU6 passed the gradient at an output of `y`: strictly inside (0, 6).
#[inline(always)]
fn relu6_open(y: f32) -> f32 {
    if y > 0.0 && y < RELU6_CAP {
        1.0
    } else {
        0.0
    }
}

#[inline(always)]
fn masked_sums_body(d: &[f32], x: &[f32], y: &[f32], mean: f32) -> (f32, f32) {
    let n = d.len().min(x.len()).min(y.len());
    let (d, x, y) = (&d[..n], &x[..n], &y[..n]);
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let (cd, cx, cy) = (d.chunks_exact(LANES), x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (mut t1, mut t2) = (0f32, 0f32);
    for ((&g, &v), &o) in cd.remainder().iter().zip(cx.remainder()).zip(cy.remainder()) {
        let g = g * relu6_open(o);
        t1 += g;
        t2 += g * (v - mean);
    }
    for ((d, x), y) in cd.zip(cx).zip(cy) {
        for i in 0..LANES {
            let g = d[i] * relu6_open(y[i]);
            s1[i] += g;
            s2[i] += g * (x[i] - mean);
        }
    }
    (s1.iter().sum::<f32>() + t1, s2.iter().sum::<f32>() + t2)
}

#[inline(always)]
fn affine2_masked_body(out: &mut [f32], x: &[f32], d: &[f32], y: &[f32], a: f32, b: f32, c: f32) {
    for (((o, &v), &g), &z) in out.iter_mut().zip(x).zip(d).zip(y) {
        *o = a * (g * relu6_open(z)) + b * v + c;
    }
}

/// ReLU6's upper bound.
const RELU6_CAP: f32 = 6.0;

with_avx2!(pub fn sum(a: &[f32]) -> f32 => sum_body);
with_avx2!(
    /// `out[i] = clamp(x[i] * scale + shift, 0, 6)`: batch norm's affine with ReLU6 fused in.
    pub fn affine_relu6(out: &mut [f32], x: &[f32], scale: f32, shift: f32) => affine_relu6_body
);
with_avx2!(
    /// Sums of `g[i]` and of `g[i] * (x[i] - mean)` with `g = d` where ReLU6's output `y` was
    /// inside (0, 6), else 0: batch norm's parameter gradients behind a fused ReLU6.
    pub fn masked_sums(d: &[f32], x: &[f32], y: &[f32], mean: f32) -> (f32, f32) => masked_sums_body
);
with_avx2!(
    /// `out[i] = a * g[i] + b * x[i] + c` with `g` masked as in [`masked_sums`].
    pub fn affine2_masked(out: &mut [f32], x: &[f32], d: &[f32], y: &[f32], a: f32, b: f32, c: f32) => affine2_masked_body
);
with_avx2!(
    /// Sum of squared deviations from `mean`.
    pub fn sum_sq_dev(a: &[f32], mean: f32) -> f32 => sum_sq_dev_body
);
with_avx2!(pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body);
with_avx2!(
    /// Sum of `d[i] * (x[i] - mean)`.
    pub fn dot_dev(d: &[f32], x: &[f32], mean: f32) -> f32 => dot_dev_body
);
with_avx2!(
    /// `out[i] = x[i] * scale + shift`.
    pub fn affine(out: &mut [f32], x: &[f32], scale: f32, shift: f32) => affine_body
);
with_avx2!(
    /// `out[i] = a * d[i] + b * x[i] + c`.
    pub fn affine2(out: &mut [f32], x: &[f32], d: &[f32], a: f32, b: f32, c: f32) => affine2_body
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_serial_sums_on_every_length() {
        for n in [0, 1, 15, 16, 17, 100, 1001] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.5).collect();
            let close = |x: f32, y: f64| assert!((x as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()), "n = {n}: {x} vs {y}");
            close(sum(&a), a.iter().map(|&x| x as f64).sum());
            close(sum_sq_dev(&a, 0.5), a.iter().map(|&x| (x as f64 - 0.5).powi(2)).sum());
            close(dot(&a, &b), a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum());
            close(dot_dev(&b, &a, -1.0), b.iter().zip(&a).map(|(&g, &x)| g as f64 * (x as f64 + 1.0)).sum());
            // Both builds: the baseline one directly.
            close(sum_body(&a), a.iter().map(|&x| x as f64).sum());
            close(dot_body(&a, &b), a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum());
        }
    }

    #[test]
    fn element_wise_loops_write_every_element() {
        let x: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let d: Vec<f32> = (0..37).map(|i| 1.0 - i as f32).collect();
        let mut out = vec![f32::NAN; 37];
        affine(&mut out, &x, 2.0, 1.0);
        assert!(out.iter().zip(&x).all(|(&o, &v)| o == v * 2.0 + 1.0));
        affine2(&mut out, &x, &d, 0.5, 2.0, -1.0);
        assert!(out.iter().zip(&x).zip(&d).all(|((&o, &v), &g)| o == 0.5 * g + 2.0 * v - 1.0));
    }
}
