//! Residual connectivity: the standard pre-norm stream, or FarSkip-Collective's two streams. This is the only
//! file of the model crate that knows FarSkip.
//!
//! FarSkip keeps the full stream R and the routed-free stream A (R minus the newest routed-expert output, which
//! may still be in flight). For a converted layer given the pair (R, A):
//! `R' = R + Attn(N1(A))`, `x = N2(R)` (pre-attention), and an MoE layer emits `(R' + (r + s), R' + s)`.
//! The exact rules, including the reference's quirks, are in DESIGN.md §1 and the fixtures'
//! FARSKIP_SEMANTICS.md; each rule is one match arm below.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which layers are far-skipped, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connectivity {
    /// Stock pre-norm residual connectivity.
    Standard,
    /// FarSkip-Collective over a range of layers.
    FarSkip(FarSkip),
}

/// A FarSkip conversion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FarSkip {
    /// First converted layer (0-based).
    pub start: usize,
    /// Last converted layer, inclusive; `None` = through the last layer.
    pub end: Option<usize>,
    /// Which sub-blocks read outdated streams.
    pub variant: FarSkipVariant,
    /// Layers after which a routed output joins the stream. Only 1 (the paper's scheme) is implemented; the
    /// field is here so deeper skips (for links slower than one layer) fit without an API change.
    pub depth: usize,
}

/// The reference's variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FarSkipVariant {
    /// Attention reads A, the MoE reads the pre-attention R (the paper's FarSkip).
    Full,
    /// Only attention reads A; the MoE reads the post-attention stream as in a stock layer.
    AttnOnly,
    /// Attention reads R; the MoE reads the pre-attention R (a parallel block, no far skip).
    MlpOnly,
}

impl FarSkip {
    /// All layers, the paper's variant.
    pub fn all() -> Self {
        Self {
            start: 0,
            end: None,
            variant: FarSkipVariant::Full,
            depth: 1,
        }
    }

    /// Layers `start..=end`.
    pub fn range(start: usize, end: usize) -> Self {
        Self {
            start,
            end: Some(end),
            ..Self::all()
        }
    }
}

impl Connectivity {
    /// Every layer converted (the paper's setting).
    pub fn farskip() -> Self {
        Self::FarSkip(FarSkip::all())
    }

    /// Whether layer `i` of a model with `num_layers` layers is converted:
    /// `start <= i <= min(end, num_layers - 1)`.
    pub fn is_converted(&self, i: usize) -> bool {
        match self {
            Self::Standard => false,
            Self::FarSkip(f) => i >= f.start && f.end.is_none_or(|e| i <= e),
        }
    }

    /// Whether MoE layers hand a (R, A) pair on.
    pub fn keeps_routed_free_stream(&self) -> bool {
        matches!(self, Self::FarSkip(_))
    }

    /// Checks the conversion against a model of `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<(), ModelError> {
        if let Self::FarSkip(f) = self {
            let err = |m: String| ModelError::InvalidConnectivity {
                spec: self.to_string(),
                message: m,
            };
            if f.depth != 1 {
                return Err(err(format!(
                    "skip depth {} is not implemented (only 1)",
                    f.depth
                )));
            }
            if f.start >= num_layers {
                return Err(err(format!(
                    "start layer {} but the model has {num_layers} layers",
                    f.start
                )));
            }
            if let Some(e) = f.end
                && e < f.start
            {
                return Err(err(format!("end {e} is before start {}", f.start)));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Connectivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Standard => write!(f, "standard"),
            Self::FarSkip(s) => {
                let name = match s.variant {
                    FarSkipVariant::Full => "farskip",
                    FarSkipVariant::AttnOnly => "farskip-attn-only",
                    FarSkipVariant::MlpOnly => "farskip-mlp-only",
                };
                write!(f, "{name}")?;
                match (s.start, s.end) {
                    (0, None) => Ok(()),
                    (a, None) => write!(f, ":{a}.."),
                    (a, Some(b)) => write!(f, ":{a}..={b}"),
                }
            }
        }
    }
}

impl FromStr for Connectivity {
    type Err = ModelError;

    /// `standard`, `farskip`, `farskip-attn-only`, `farskip-mlp-only`, each FarSkip form optionally followed
    /// by `:START..=END` (inclusive), `:START..END` (half-open) or `:START..` (to the last layer).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |m: &str| ModelError::InvalidConnectivity {
            spec: spec.to_string(),
            message: m.to_string(),
        };
        let (name, range) = match spec.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (spec, None),
        };
        let variant = match name {
            "standard" if range.is_none() => return Ok(Self::Standard),
            "standard" => return Err(err("standard takes no layer range")),
            "farskip" => FarSkipVariant::Full,
            "farskip-attn-only" => FarSkipVariant::AttnOnly,
            "farskip-mlp-only" => FarSkipVariant::MlpOnly,
            _ => {
                return Err(err(
                    "expected standard, farskip, farskip-attn-only or farskip-mlp-only, optionally with :START..=END",
                ));
            }
        };
        let (start, end) = match range {
            None => (0, None),
            Some(r) => {
                let num = |s: &str| {
                    s.trim()
                        .parse::<usize>()
                        .map_err(|_| err(&format!("`{s}` is not a layer index")))
                };
                if let Some((a, b)) = r.split_once("..=") {
                    (num(a)?, Some(num(b)?))
                } else if let Some((a, b)) = r.split_once("..") {
                    if b.trim().is_empty() {
                        (num(a)?, None)
                    } else {
                        let b = num(b)?;
                        if b == 0 {
                            return Err(err("empty half-open range"));
                        }
                        (num(a)?, Some(b - 1))
                    }
                } else {
                    return Err(err("range must be START..=END, START..END or START.."));
                }
            }
        };
        if let Some(e) = end
            && e < start
        {
            return Err(err("range end is before its start"));
        }
        Ok(Self::FarSkip(FarSkip {
            start,
            end,
            variant,
            depth: 1,
        }))
    }
}

/// The state handed from layer to layer.
#[derive(Clone, Debug)]
pub enum Residual {
    /// One stream (standard layers, dense layers, the embeddings).
    Plain(Tensor<3>),
    /// The full stream R and the routed-free stream A.
    Pair {
        /// R: everything so far.
        full: Tensor<3>,
        /// A: R without the newest routed-expert output.
        routed_free: Tensor<3>,
    },
}

impl Residual {
    /// The full stream R (what the final norm reads).
    pub fn full(self) -> Tensor<3> {
        match self {
            Self::Plain(h) => h,
            Self::Pair { full, .. } => full,
        }
    }
}

/// Where a layer's feed-forward block reads from.
#[derive(Clone, Debug)]
pub enum FfnInput {
    /// The post-attention stream R' (a stock layer).
    PostAttention,
    /// A stream known before attention runs (a converted layer): it can run in parallel with attention.
    PreAttention(Tensor<3>),
}

/// What a layer's sub-blocks read.
#[derive(Clone, Debug)]
pub struct LayerInputs {
    /// R: the stream attention's output is added to.
    pub residual: Tensor<3>,
    /// The stream attention reads (before its norm).
    pub attn_in: Tensor<3>,
    /// The stream the MLP / MoE reads (before its norm).
    pub ffn_in: FfnInput,
}

impl Connectivity {
    /// Splits the incoming state into what layer `i` reads.
    pub fn layer_inputs(&self, i: usize, state: Residual) -> LayerInputs {
        let variant = match self {
            Self::FarSkip(f) if self.is_converted(i) => f.variant,
            // A stock layer takes R and drops A.
            _ => {
                let r = state.full();
                return LayerInputs {
                    residual: r.clone(),
                    attn_in: r,
                    ffn_in: FfnInput::PostAttention,
                };
            }
        };
        // A converted layer given one tensor uses R = A = M = h; given a pair it uses M = R (pre-attention).
        let (r, a) = match state {
            Residual::Plain(h) => (h.clone(), h),
            Residual::Pair { full, routed_free } => (full, routed_free),
        };
        match variant {
            FarSkipVariant::Full => LayerInputs {
                residual: r.clone(),
                attn_in: a,
                ffn_in: FfnInput::PreAttention(r),
            },
            FarSkipVariant::AttnOnly => LayerInputs {
                residual: r,
                attn_in: a,
                ffn_in: FfnInput::PostAttention,
            },
            FarSkipVariant::MlpOnly => LayerInputs {
                residual: r.clone(),
                attn_in: r.clone(),
                ffn_in: FfnInput::PreAttention(r),
            },
        }
    }

    /// Output of an MoE layer, converted or not: `(R' + (r + s), R' + s)` under FarSkip (the reference hands
    /// the pair on from every MoE layer), `R' + (r + s)` otherwise.
    ///
    /// # Shapes
    /// - all inputs `[batch, seq, hidden]`
    pub fn moe_output(
        &self,
        post_attention: Tensor<3>,
        routed: Tensor<3>,
        shared: Option<Tensor<3>>,
    ) -> Residual {
        let moe = match &shared {
            Some(s) => routed + s.clone(),
            None => routed,
        };
        let full = post_attention.clone() + moe;
        if !self.keeps_routed_free_stream() {
            return Residual::Plain(full);
        }
        let routed_free = match shared {
            Some(s) => post_attention + s,
            None => post_attention,
        };
        Residual::Pair { full, routed_free }
    }

    /// Output of a dense layer: `R' + MLP(x)`; the routed-free stream collapses into R.
    pub fn dense_output(&self, post_attention: Tensor<3>, mlp: Tensor<3>) -> Residual {
        Residual::Plain(post_attention + mlp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let p = |s: &str| s.parse::<Connectivity>().unwrap();
        assert_eq!(p("standard"), Connectivity::Standard);
        assert_eq!(p("farskip"), Connectivity::farskip());
        assert_eq!(
            p("farskip:1..=3"),
            Connectivity::FarSkip(FarSkip::range(1, 3))
        );
        assert_eq!(
            p("farskip:1..3"),
            Connectivity::FarSkip(FarSkip::range(1, 2))
        );
        let c = p("farskip-mlp-only:2..");
        assert!(!c.is_converted(1) && c.is_converted(2) && c.is_converted(99));
        assert_eq!(c.to_string(), "farskip-mlp-only:2..");
        assert_eq!(p("farskip-attn-only").to_string(), "farskip-attn-only");
        for bad in [
            "",
            "far",
            "standard:1..2",
            "farskip:3..=1",
            "farskip:a..=2",
            "farskip:2..2",
            "farskip:5",
        ] {
            assert!(bad.parse::<Connectivity>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn conversion_range_is_inclusive() {
        let c = Connectivity::FarSkip(FarSkip::range(1, 2));
        let converted: Vec<bool> = (0..4).map(|i| c.is_converted(i)).collect();
        assert_eq!(converted, [false, true, true, false]);
        assert!(c.validate(4).is_ok());
        assert!(
            Connectivity::FarSkip(FarSkip::range(4, 5))
                .validate(4)
                .is_err()
        );
        let deep = Connectivity::FarSkip(FarSkip {
            depth: 2,
            ..FarSkip::all()
        });
        assert!(deep.validate(4).is_err());
    }

    fn t(v: f32) -> Tensor<3> {
        Tensor::from_floats([[[v]]], &Device::flex())
    }
    fn val(x: &Tensor<3>) -> f32 {
        x.clone().into_scalar::<f32>()
    }

    #[test]
    fn stock_and_converted_layers_read_the_right_streams() {
        let fs = Connectivity::FarSkip(FarSkip::range(1, 1));
        let pair = || Residual::Pair {
            full: t(10.0),
            routed_free: t(3.0),
        };
        // stock layer 0 drops A
        let li = fs.layer_inputs(0, pair());
        assert_eq!((val(&li.residual), val(&li.attn_in)), (10.0, 10.0));
        assert!(matches!(li.ffn_in, FfnInput::PostAttention));
        // converted layer: attention reads A, MoE reads pre-attention R
        let li = fs.layer_inputs(1, pair());
        assert_eq!((val(&li.residual), val(&li.attn_in)), (10.0, 3.0));
        assert!(matches!(li.ffn_in, FfnInput::PreAttention(ref m) if val(m) == 10.0));
        // converted layer given one tensor: R = A = M
        let li = fs.layer_inputs(1, Residual::Plain(t(7.0)));
        assert_eq!((val(&li.residual), val(&li.attn_in)), (7.0, 7.0));
        // variants
        let attn_only: Connectivity = "farskip-attn-only".parse().unwrap();
        let li = attn_only.layer_inputs(0, pair());
        assert_eq!(val(&li.attn_in), 3.0);
        assert!(matches!(li.ffn_in, FfnInput::PostAttention));
        let mlp_only: Connectivity = "farskip-mlp-only".parse().unwrap();
        let li = mlp_only.layer_inputs(0, pair());
        assert_eq!(val(&li.attn_in), 10.0);
        assert!(matches!(li.ffn_in, FfnInput::PreAttention(ref m) if val(m) == 10.0));
    }

    #[test]
    fn moe_layers_emit_the_pair_under_farskip_even_when_stock() {
        let fs = Connectivity::FarSkip(FarSkip::range(3, 3));
        match fs.moe_output(t(1.0), t(2.0), Some(t(4.0))) {
            Residual::Pair { full, routed_free } => {
                assert_eq!((val(&full), val(&routed_free)), (7.0, 5.0))
            }
            Residual::Plain(_) => panic!("expected a pair"),
        }
        match Connectivity::Standard.moe_output(t(1.0), t(2.0), None) {
            Residual::Plain(h) => assert_eq!(val(&h), 3.0),
            Residual::Pair { .. } => panic!("standard keeps one stream"),
        }
        assert!(matches!(
            fs.dense_output(t(1.0), t(1.0)),
            Residual::Plain(_)
        ));
    }
}
