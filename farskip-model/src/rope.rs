//! Rotary position embeddings: the frequency tables (plain, linear, Llama-3, YaRN) and their application in
//! either pairing. Interleaved pairs are applied by de-interleaving first and rotating halves; queries and keys
//! get the same permutation, so every dot product equals the interleaved (complex) formulation.

use burn::prelude::*;

use crate::config::{RopeConfig, RopeLayout, RopeScaling};

/// Precomputed inverse frequencies for one rotary width.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f64,
    layout: RopeLayout,
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Rope {
    /// Frequencies for a rotary width `dim` (even).
    pub fn new(cfg: &RopeConfig, dim: usize) -> Self {
        let half = dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / cfg.theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv, attention_factor) = match &cfg.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
                ..
            } => {
                let correction_dim = |rot: f64| {
                    (dim as f64
                        * (original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * cfg.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extra)| {
                        // HF computes the ramp in f32; the difference is far below the tolerance.
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let inter = extra / factor;
                        inter * (1.0 - extrapolation) + extra * extrapolation
                    })
                    .collect();
                (inv, *attention_factor)
            }
        };
        Self {
            inv_freq: inv.iter().map(|&f| f as f32).collect(),
            attention_factor,
            layout: cfg.layout,
        }
    }

    /// The YaRN `attention_factor` computed for a config (`m(f, mscale) / m(f, mscale_all_dim)`).
    pub fn yarn_attention_factor(factor: f64, mscale: f64, mscale_all_dim: f64) -> f64 {
        if mscale != 0.0 && mscale_all_dim != 0.0 {
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        } else {
            yarn_mscale(factor, 1.0)
        }
    }

    /// DeepSeek's softmax-scale multiplier under YaRN: `m(factor, mscale_all_dim)²` (1 otherwise).
    pub fn softmax_scale_multiplier(cfg: &RopeConfig) -> f64 {
        match cfg.scaling {
            RopeScaling::Yarn {
                softmax_factor,
                mscale_all_dim,
                ..
            } if mscale_all_dim != 0.0 => {
                let m = yarn_mscale(softmax_factor, mscale_all_dim);
                m * m
            }
            _ => 1.0,
        }
    }

    /// `cos` and `sin` tables for positions `offset..offset + len`.
    ///
    /// # Shapes
    /// - output: `([len, dim], [len, dim])`
    pub fn tables(&self, offset: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let (cos, sin) = self.table_rows(offset, len);
        let dim = 2 * self.inv_freq.len();
        (
            Tensor::from_data(TensorData::new(cos, [len, dim]), device),
            Tensor::from_data(TensorData::new(sin, [len, dim]), device),
        )
    }

    /// [`Self::tables`] on the host, `[len, dim]` each.
    pub fn table_rows(&self, offset: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(len * dim);
        let mut sin = Vec::with_capacity(len * dim);
        for p in offset..offset + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(
                    row.iter()
                        .map(|&a| (a.cos() as f64 * self.attention_factor) as f32),
                );
                sin.extend(
                    row.iter()
                        .map(|&a| (a.sin() as f64 * self.attention_factor) as f32),
                );
            }
        }
        (cos, sin)
    }

    /// [`Self::apply`] to one head's vector on the host (`dim` values; `cos`, `sin` one row of
    /// [`Self::table_rows`]), with the same f32 operations.
    pub fn rotate_row(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let d = x.len();
        let h = d / 2;
        let src: Vec<f32> = match self.layout {
            RopeLayout::Half => x.to_vec(),
            RopeLayout::Interleaved => (0..d).map(|i| x[(i % h) * 2 + i / h]).collect(),
        };
        for i in 0..d {
            let rotated = match i < h {
                true => -src[i + h],
                false => src[i - h],
            };
            x[i] = src[i] * cos[i] + rotated * sin[i];
        }
    }

    /// Rotates `x`.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, dim]`; `cos`, `sin`: `[seq, dim]`
    /// - output: `[batch, heads, seq, dim]` (for [`RopeLayout::Interleaved`], in de-interleaved order)
    pub fn apply(&self, x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let x = match self.layout {
            RopeLayout::Half => x,
            RopeLayout::Interleaved => x
                .reshape([b, h, t, d / 2, 2])
                .swap_dims(3, 4)
                .reshape([b, h, t, d]),
        };
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = cos.clone().unsqueeze::<4>();
        let sin = sin.clone().unsqueeze::<4>();
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(layout: RopeLayout, scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            layout,
            scaling,
        }
    }

    #[test]
    fn half_layout_rotates_pairs_i_and_i_plus_half() {
        let dev = Device::flex();
        let rope = Rope::new(&cfg(RopeLayout::Half, RopeScaling::None), 4);
        // inv_freq = [1, 1/100]; position 3.
        let (cos, sin) = rope.tables(3, 1, &dev);
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &dev);
        let y: Vec<f32> = rope
            .apply(x, &cos, &sin)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let (a0, a1) = (3.0f64, 0.03f64);
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn interleaved_layout_rotates_adjacent_pairs() {
        let dev = Device::flex();
        let rope = Rope::new(&cfg(RopeLayout::Interleaved, RopeScaling::None), 4);
        let (cos, sin) = rope.tables(2, 1, &dev);
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &dev);
        let y: Vec<f32> = rope
            .apply(x, &cos, &sin)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let (a0, a1) = (2.0f64, 0.02f64);
        // pairs (1,2) at freq 1 and (3,4) at freq 1/100, written [evens | odds]
        let want = [
            1.0 * a0.cos() - 2.0 * a0.sin(),
            3.0 * a1.cos() - 4.0 * a1.sin(),
            1.0 * a0.sin() + 2.0 * a0.cos(),
            3.0 * a1.sin() + 4.0 * a1.cos(),
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn yarn_matches_hand_computed_frequencies() {
        // DeepSeek-V3 fixture values: dim 8, theta 1e4, factor 4, original 32, beta 32/1.
        let scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: Rope::yarn_attention_factor(4.0, 1.0, 1.0),
            mscale_all_dim: 1.0,
            softmax_factor: 4.0,
            truncate: true,
        };
        let rope = Rope::new(&cfg(RopeLayout::Interleaved, scaling.clone()), 8);
        // correction dims: low = floor(8 ln(32/(64π)) / (2 ln 1e4)) = floor(-0.7477) = -1 -> 0;
        // high = ceil(8 ln(32/(2π)) / (2 ln 1e4)) = ceil(0.3536) = 1. ramp = clamp(i, 0, 1).
        let base: Vec<f64> = (0..4)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / 8.0))
            .collect();
        let want: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 0 { b } else { b / 4.0 })
            .collect();
        for (g, w) in rope.inv_freq.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() < 1e-7 * w.max(1.0),
                "{:?} vs {want:?}",
                rope.inv_freq
            );
        }
        assert_eq!(rope.attention_factor, 1.0);
        let m = 1.0 + 0.1 * 4f64.ln();
        let got = Rope::softmax_scale_multiplier(&cfg(RopeLayout::Interleaved, scaling));
        assert!((got - m * m).abs() < 1e-12);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let rope = Rope::new(&cfg(RopeLayout::Half, scaling), 16);
        let base: Vec<f64> = (0..8)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / 16.0))
            .collect();
        // wavelength 2π/f: < 16 keeps f, > 64 divides by 8.
        for (g, b) in rope.inv_freq.iter().zip(&base) {
            let wl = 2.0 * std::f64::consts::PI / b;
            if wl < 16.0 {
                assert!((*g as f64 - b).abs() < 1e-7);
            } else if wl > 64.0 {
                assert!((*g as f64 - b / 8.0).abs() < 1e-7);
            } else {
                assert!(*g as f64 <= *b + 1e-9 && *g as f64 >= b / 8.0 - 1e-9);
            }
        }
    }
}
