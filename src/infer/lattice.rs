//! The permutohedral lattice (Adams, Baek and Davis, "Fast High-Dimensional Filtering Using the
//! Permutohedral Lattice", 2010), as Krähenbühl and Koltun use it for the dense CRF: a Gaussian
//! filter over points in a d-dimensional feature space (for the CRF: position and colour) in
//! time linear in the number of points. Each point is splatted onto the d + 1 vertices of the
//! lattice simplex that encloses it, the vertex values are blurred along each of the d + 1
//! lattice axes with a [1 2 1] kernel, and each point reads its value back with the same
//! barycentric weights.
//!
//! The lattice is built once per image; filtering then costs O(points x (d + 1) x values).
//! Splatting is done as a gather (each vertex sums the points that touch it, through an
//! inverted index), so every pass runs in parallel without atomics.

use rayon::prelude::*;

/// "No neighbour" in the blur neighbour table.
const NONE: u32 = u32::MAX;

/// A permutohedral lattice over `n` points with `d` features each.
pub struct Lattice {
    d: usize,
    n: usize,
    /// Vertices in the lattice.
    m: usize,
    /// Per point, the d + 1 vertices of its simplex and their barycentric weights.
    vertex: Vec<u32>,
    weight: Vec<f32>,
    /// Inverted index: the (point, weight) pairs of vertex v are `entries[start[v]..start[v + 1]]`.
    start: Vec<u32>,
    entries: Vec<(u32, f32)>,
    /// For lattice axis j and vertex v: `neighbours[j * m + v]` = the two neighbours along j.
    neighbours: Vec<(u32, u32)>,
}

/// Open-addressing hash table from lattice keys (d integers) to vertex indices.
struct KeyTable {
    d: usize,
    keys: Vec<i32>,
    slots: Vec<u32>,
}

impl KeyTable {
    fn new(d: usize, expected: usize) -> Self {
        let cap = (expected * 2).next_power_of_two().max(64);
        Self { d, keys: Vec::with_capacity(expected * d), slots: vec![NONE; cap] }
    }

    fn len(&self) -> usize {
        self.keys.len() / self.d
    }

    fn hash(key: &[i32]) -> usize {
        let mut h: u64 = 0;
        for &k in key {
            h = (h.wrapping_add(k as u32 as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        (h ^ (h >> 29)) as usize
    }

    fn key(&self, v: usize) -> &[i32] {
        &self.keys[v * self.d..(v + 1) * self.d]
    }

    fn find(&self, key: &[i32]) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = Self::hash(key) & mask;
        loop {
            let s = self.slots[i];
            if s == NONE {
                return None;
            }
            if self.key(s as usize) == key {
                return Some(s);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, key: &[i32]) -> u32 {
        if (self.len() + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = Self::hash(key) & mask;
        loop {
            let s = self.slots[i];
            if s == NONE {
                let v = self.len() as u32;
                self.keys.extend_from_slice(key);
                self.slots[i] = v;
                return v;
            }
            if self.key(s as usize) == key {
                return s;
            }
            i = (i + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let cap = self.slots.len() * 2;
        self.slots = vec![NONE; cap];
        let mask = cap - 1;
        for v in 0..self.len() {
            let mut i = Self::hash(self.key(v)) & mask;
            while self.slots[i] != NONE {
                i = (i + 1) & mask;
            }
            self.slots[i] = v as u32;
        }
    }
}

/// The most features a point may have (the CRF uses 5: position and colour).
pub const MAX_FEATURES: usize = 7;

/// The enclosing simplex of one point: its remainder-0 vertex, the rank of each coordinate and
/// the barycentric weights (the first d + 1 entries of each are used). Fixed-size arrays keep
/// the per-point work free of allocation.
struct Simplex {
    rem0: [i32; MAX_FEATURES + 1],
    rank: [usize; MAX_FEATURES + 1],
    barycentric: [f32; MAX_FEATURES + 2],
}

/// Elevates a point onto the lattice's hyperplane and finds the simplex that holds it
/// (Adams et al. 2010, section 3.1; the same steps as Krähenbühl's implementation).
fn simplex(f: &[f32], scale: &[f32]) -> Simplex {
    let d = f.len();
    let mut elevated = [0f32; MAX_FEATURES + 1];
    let mut sm = 0f32;
    for j in (1..=d).rev() {
        let cf = f[j - 1] * scale[j - 1];
        elevated[j] = sm - j as f32 * cf;
        sm += cf;
    }
    elevated[0] = sm;
    // The closest remainder-0 lattice point, by rounding each coordinate to a multiple of d + 1.
    let down = 1.0 / (d + 1) as f32;
    let up = (d + 1) as f32;
    let mut rem0 = [0i32; MAX_FEATURES + 1];
    let mut sum = 0i32;
    for i in 0..=d {
        let v = down * elevated[i];
        let hi = v.ceil() * up;
        let lo = v.floor() * up;
        let r = if hi - elevated[i] < elevated[i] - lo { hi } else { lo };
        rem0[i] = r as i32;
        sum += r as i32 / (d + 1) as i32;
    }
    // Rank of each coordinate's remainder in sorted order.
    let mut rank = [0i32; MAX_FEATURES + 1];
    for i in 0..d {
        let di = elevated[i] - rem0[i] as f32;
        for j in i + 1..=d {
            if di < elevated[j] - rem0[j] as f32 {
                rank[i] += 1;
            } else {
                rank[j] += 1;
            }
        }
    }
    // Bring the point back onto the plane when the rounding left the coordinate sum non-zero.
    for i in 0..=d {
        rank[i] += sum;
        if rank[i] < 0 {
            rank[i] += d as i32 + 1;
            rem0[i] += d as i32 + 1;
        } else if rank[i] > d as i32 {
            rank[i] -= d as i32 + 1;
            rem0[i] -= d as i32 + 1;
        }
    }
    let mut barycentric = [0f32; MAX_FEATURES + 2];
    for i in 0..=d {
        let v = (elevated[i] - rem0[i] as f32) * down;
        let r = rank[i] as usize;
        barycentric[d - r] += v;
        barycentric[d + 1 - r] -= v;
    }
    barycentric[0] += 1.0 + barycentric[d + 1];
    Simplex { rem0, rank: rank.map(|r| r as usize), barycentric }
}

impl Lattice {
    /// Builds the lattice over `features`: `n` points of `d` values each, point after point,
    /// already divided by the kernel's standard deviation per feature.
    pub fn new(features: &[f32], d: usize) -> Self {
        assert!(d > 0 && d <= MAX_FEATURES && features.len().is_multiple_of(d), "features must be n x d, d at most {MAX_FEATURES}");
        let n = features.len() / d;
        // Expected standard deviation of the filter (p. 6 of Adams et al.) and the diagonal of E.
        let inv_std = (2.0f32 / 3.0).sqrt() * (d + 1) as f32;
        let scale: Vec<f32> = (0..d).map(|i| inv_std / (((i + 2) * (i + 1)) as f32).sqrt()).collect();
        // The canonical simplex: remainder r's vertex offset for a coordinate of rank k.
        let canonical = |r: usize, k: usize| -> i32 {
            if k + r <= d {
                r as i32
            } else {
                r as i32 - (d as i32 + 1)
            }
        };

        let simplices: Vec<Simplex> = features.par_chunks(d).map(|f| simplex(f, &scale)).collect();
        let mut table = KeyTable::new(d, n.max(1));
        let mut vertex = vec![0u32; n * (d + 1)];
        let mut weight = vec![0f32; n * (d + 1)];
        let mut key = vec![0i32; d];
        for (p, s) in simplices.iter().enumerate() {
            for r in 0..=d {
                for (i, k) in key.iter_mut().enumerate() {
                    *k = s.rem0[i] + canonical(r, s.rank[i]);
                }
                vertex[p * (d + 1) + r] = table.insert(&key);
                weight[p * (d + 1) + r] = s.barycentric[r];
            }
        }
        drop(simplices);
        let m = table.len();

        // Inverted index, for splatting as a gather.
        let mut start = vec![0u32; m + 1];
        for &v in &vertex {
            start[v as usize + 1] += 1;
        }
        for v in 0..m {
            start[v + 1] += start[v];
        }
        let mut fill = start.clone();
        let mut entries = vec![(0u32, 0f32); vertex.len()];
        for (i, (&v, &w)) in vertex.iter().zip(&weight).enumerate() {
            let slot = &mut fill[v as usize];
            entries[*slot as usize] = ((i / (d + 1)) as u32, w);
            *slot += 1;
        }

        // Neighbours along each axis j: all coordinates -1 except j which is +d, and the opposite.
        let mut neighbours = vec![(NONE, NONE); (d + 1) * m];
        neighbours.par_chunks_mut(m).enumerate().for_each(|(j, row)| {
            let mut n1 = vec![0i32; d];
            let mut n2 = vec![0i32; d];
            for (v, out) in row.iter_mut().enumerate() {
                let k = table.key(v);
                for i in 0..d {
                    n1[i] = k[i] - 1;
                    n2[i] = k[i] + 1;
                }
                if j < d {
                    n1[j] = k[j] + d as i32;
                    n2[j] = k[j] - d as i32;
                }
                *out = (table.find(&n1).unwrap_or(NONE), table.find(&n2).unwrap_or(NONE));
            }
        });
        Self { d, n, m, vertex, weight, start, entries, neighbours }
    }

    /// Points.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Lattice vertices.
    pub fn vertices(&self) -> usize {
        self.m
    }

    /// Gaussian-filters `values` (n points x `c` channels, point after point) over the
    /// lattice's feature space; the result has the same layout. Each output includes the
    /// point's own value.
    pub fn filter(&self, values: &[f32], c: usize) -> Vec<f32> {
        self.slice(self.blur(self.splat(values, c), c), c)
    }

    /// Splatting: each lattice vertex gathers its points' values, weighted barycentrically
    /// (vertices x `c`).
    pub fn splat(&self, values: &[f32], c: usize) -> Vec<f32> {
        assert_eq!(values.len(), self.n * c, "values must be n x c");
        let m = self.m;
        let mut grid = vec![0f32; m * c];
        grid.par_chunks_mut(c).enumerate().for_each(|(v, out)| {
            for &(p, w) in &self.entries[self.start[v] as usize..self.start[v + 1] as usize] {
                let src = &values[p as usize * c..(p as usize + 1) * c];
                for (o, &s) in out.iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        });
        grid
    }

    /// Blurring along each lattice axis with [1 2 1] / 2 (the missing neighbours count as zero).
    pub fn blur(&self, mut grid: Vec<f32>, c: usize) -> Vec<f32> {
        let (d, m) = (self.d, self.m);
        let mut next = vec![0f32; m * c];
        for j in 0..=d {
            let nb = &self.neighbours[j * m..(j + 1) * m];
            let old = &grid;
            next.par_chunks_mut(c).enumerate().for_each(|(v, out)| {
                out.copy_from_slice(&old[v * c..(v + 1) * c]);
                let (n1, n2) = nb[v];
                for n in [n1, n2] {
                    if n != NONE {
                        let src = &old[n as usize * c..(n as usize + 1) * c];
                        for (o, &s) in out.iter_mut().zip(src) {
                            *o += 0.5 * s;
                        }
                    }
                }
            });
            std::mem::swap(&mut grid, &mut next);
        }
        grid
    }

    /// Slicing: each point reads its vertices back, with the constant that makes the blur's
    /// scale match (Adams et al.).
    pub fn slice(&self, grid: Vec<f32>, c: usize) -> Vec<f32> {
        let d = self.d;
        let alpha = 1.0 / (1.0 + 2f32.powi(-(d as i32)));
        let mut out = vec![0f32; self.n * c];
        out.par_chunks_mut(c).enumerate().for_each(|(p, o)| {
            for r in 0..=d {
                let v = self.vertex[p * (d + 1) + r] as usize;
                let w = self.weight[p * (d + 1) + r] * alpha;
                for (x, &g) in o.iter_mut().zip(&grid[v * c..(v + 1) * c]) {
                    *x += w * g;
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn barycentric_weights_are_a_partition_of_unity() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let f: Vec<f32> = (0..500 * 5).map(|_| rng.random_range(-20.0..20.0)).collect();
        let l = Lattice::new(&f, 5);
        for p in 0..l.len() {
            let w = &l.weight[p * 6..(p + 1) * 6];
            assert!(w.iter().all(|&x| x >= -1e-4), "{w:?}");
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{w:?}");
        }
    }

    /// The lattice approximates a Gaussian: compared with the exact filter on random points,
    /// the outputs correlate almost perfectly (after the scale each one has).
    #[test]
    fn filter_follows_the_exact_gaussian() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 400;
        let d = 3;
        let f: Vec<f32> = (0..n * d).map(|_| rng.random_range(0.0..4.0)).collect();
        let v: Vec<f32> = (0..n).map(|i| if f[i * d] > 2.0 { 1.0 } else { 0.0 }).collect();
        let l = Lattice::new(&f, d);
        let approx = l.filter(&v, 1);
        let ones = l.filter(&vec![1.0; n], 1);
        let exact: Vec<f32> = (0..n)
            .map(|i| {
                let (mut num, mut den) = (0.0, 0.0);
                for j in 0..n {
                    let d2: f32 = (0..d).map(|k| (f[i * d + k] - f[j * d + k]).powi(2)).sum();
                    let w = (-d2 / 2.0).exp();
                    num += w * v[j];
                    den += w;
                }
                num / den
            })
            .collect();
        let normalised: Vec<f32> = approx.iter().zip(&ones).map(|(a, o)| a / o).collect();
        let mean = |x: &[f32]| x.iter().sum::<f32>() / x.len() as f32;
        let (ma, me) = (mean(&normalised), mean(&exact));
        let cov: f32 = normalised.iter().zip(&exact).map(|(a, e)| (a - ma) * (e - me)).sum();
        let va: f32 = normalised.iter().map(|a| (a - ma).powi(2)).sum();
        let ve: f32 = exact.iter().map(|e| (e - me).powi(2)).sum();
        let corr = cov / (va * ve).sqrt();
        assert!(corr > 0.97, "correlation with the exact Gaussian filter {corr}");
        // Normalised outputs stay a weighted mean of the inputs.
        assert!(normalised.iter().all(|&x| (-1e-3..=1.0 + 1e-3).contains(&x)));
    }

    /// Points far apart in feature space do not exchange values.
    #[test]
    fn distant_clusters_stay_apart() {
        let mut f = vec![];
        let mut v = vec![];
        for i in 0..50 {
            f.extend([i as f32 * 0.01, 0.0]);
            v.push(1.0);
            f.extend([100.0 + i as f32 * 0.01, 0.0]);
            v.push(0.0);
        }
        let l = Lattice::new(&f, 2);
        let out = l.filter(&v, 1);
        for (i, o) in out.iter().enumerate() {
            if i % 2 == 1 {
                assert_eq!(*o, 0.0);
            } else {
                assert!(*o > 1.0);
            }
        }
    }
}
