//! Residual connectivity: the standard pre-norm stream, or FarSkip-Collective's two streams. This is the only
//! file of the model crate that knows FarSkip.
//!
//! FarSkip keeps the full stream R and the routed-free stream A (R minus the newest routed-expert output, which
//! may still be in flight). For a converted layer given the pair (R, A):
//! `R' = R + Attn(N1(A))`, `x = N2(R)` (pre-attention), and an MoE layer emits `(R' + (r + s), R' + s)`.
//!
//! At skip depth d ≥ 2 a routed output stays in flight for d layers: the state is the settled stream S and a
//! queue P of in-flight routed outputs (newest first, at most d), R = S + ΣP. A converted layer's attention reads
//! S; its MoE reads S plus the oldest in-flight output once d are queued, and that output settles. Depth 1 is
//! the pair above (kept as its own representation so its additions stay in the reference's order).
//!
//! The exact rules, including the reference's quirks, are in DESIGN.md §1 and the fixtures' README
//! ("FarSkip at skip depth d") and FARSKIP_SEMANTICS.md; each rule is one match arm below.

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
    /// Skip depth: how many layers a routed output may stay in flight before a layer reads it. 1 is the
    /// paper's scheme; deeper skips (for links slower than one attention) exist for the full variant only.
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

    /// The same conversion at skip depth `depth`.
    pub fn with_depth(self, depth: usize) -> Self {
        Self { depth, ..self }
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

    /// The skip depth: `None` for standard connectivity, else how many layers a routed output may stay in
    /// flight (1 = the paper's FarSkip).
    pub fn depth(&self) -> Option<usize> {
        match self {
            Self::Standard => None,
            Self::FarSkip(f) => Some(f.depth),
        }
    }

    /// Skip depth when it is deeper than the paper's (≥ 2), else `None`.
    fn deep(&self) -> Option<usize> {
        self.depth().filter(|&d| d > 1)
    }

    /// Checks the conversion against a model of `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<(), ModelError> {
        if let Self::FarSkip(f) = self {
            let err = |m: String| ModelError::InvalidConnectivity {
                spec: self.to_string(),
                message: m,
            };
            if f.depth == 0 {
                return Err(err("skip depth must be at least 1".into()));
            }
            if f.depth > 1 && f.variant != FarSkipVariant::Full {
                return Err(err(format!(
                    "skip depth {} applies to the full variant only (farskip-dN), not to {}",
                    f.depth,
                    f.variant.name()
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

impl FarSkipVariant {
    /// The variant's name in the string form of a [`Connectivity`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "farskip",
            Self::AttnOnly => "farskip-attn-only",
            Self::MlpOnly => "farskip-mlp-only",
        }
    }
}

impl fmt::Display for Connectivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Standard => write!(f, "standard"),
            Self::FarSkip(s) => {
                write!(f, "{}", s.variant.name())?;
                if s.depth != 1 {
                    write!(f, "-d{}", s.depth)?;
                }
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

    /// `standard`, `farskip`, `farskip-dN` (skip depth N ≥ 1; `farskip` = `farskip-d1`), `farskip-attn-only`,
    /// `farskip-mlp-only`, each FarSkip form optionally followed by `:START..=END` (inclusive), `:START..END`
    /// (half-open) or `:START..` (to the last layer).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |m: &str| ModelError::InvalidConnectivity {
            spec: spec.to_string(),
            message: m.to_string(),
        };
        let (name, range) = match spec.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (spec, None),
        };
        let (name, depth) = match name.rsplit_once("-d") {
            Some((base, d)) if base.starts_with("farskip") => {
                let depth = d.parse::<usize>().map_err(|_| {
                    err(&format!(
                        "`{d}` is not a skip depth (expected farskip-dN with N ≥ 1, e.g. farskip-d2)"
                    ))
                })?;
                if depth == 0 {
                    return Err(err("skip depth must be at least 1 (farskip-d1 is farskip)"));
                }
                if base != "farskip" {
                    return Err(err(&format!(
                        "skip depth applies to the full variant only (farskip-d{depth}), not to {base}"
                    )));
                }
                (base, depth)
            }
            _ => (name, 1),
        };
        let variant = match name {
            "standard" if range.is_none() => return Ok(Self::Standard),
            "standard" => return Err(err("standard takes no layer range")),
            "farskip" => FarSkipVariant::Full,
            "farskip-attn-only" => FarSkipVariant::AttnOnly,
            "farskip-mlp-only" => FarSkipVariant::MlpOnly,
            _ => {
                return Err(err(
                    "expected standard, farskip, farskip-dN, farskip-attn-only or farskip-mlp-only, optionally with :START..=END",
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
            depth,
        }))
    }
}

/// The state handed from layer to layer.
#[derive(Clone, Debug)]
pub enum Residual {
    /// One stream (standard layers, dense layers, the embeddings).
    Plain(Tensor<3>),
    /// The full stream R and the routed-free stream A (skip depth 1).
    Pair {
        /// R: everything so far.
        full: Tensor<3>,
        /// A: R without the newest routed-expert output.
        routed_free: Tensor<3>,
    },
    /// The settled stream S and the routed outputs still in flight (skip depth ≥ 2): R = S + ΣP.
    InFlight {
        /// S: everything but the in-flight routed outputs.
        settled: Tensor<3>,
        /// P: the routed outputs of the most recent MoE layers, newest first, at most the skip depth.
        routed: Vec<Tensor<3>>,
    },
}

impl Residual {
    /// The full stream R (what the final norm reads).
    pub fn full(self) -> Tensor<3> {
        match self {
            Self::Plain(h) => h,
            Self::Pair { full, .. } => full,
            Self::InFlight { settled, routed } => add_all(settled, routed),
        }
    }
}

/// `x + p_0 + p_1 + …`, left to right.
fn add_all(x: Tensor<3>, ps: Vec<Tensor<3>>) -> Tensor<3> {
    ps.into_iter().fold(x, |acc, p| acc + p)
}

/// Where a layer's feed-forward block reads from.
#[derive(Clone, Debug)]
pub enum FfnInput {
    /// The post-attention stream R' (a stock layer).
    PostAttention,
    /// A stream known before attention runs (a converted layer): it can run in parallel with attention.
    PreAttention(Tensor<3>),
}

impl FfnInput {
    /// The stream the feed-forward block reads (before its norm), given the layer's post-attention stream.
    pub fn stream(self, post_attention: &Tensor<3>) -> Tensor<3> {
        match self {
            FfnInput::PostAttention => post_attention.clone(),
            FfnInput::PreAttention(m) => m,
        }
    }
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
    /// Routed outputs still in flight that this layer hands on untouched (newest first): empty but for
    /// converted layers at skip depth ≥ 2. Pass them to [`Connectivity::moe_output`] /
    /// [`Connectivity::dense_output`].
    pub in_flight: Vec<Tensor<3>>,
}

impl Connectivity {
    /// Splits the incoming state into what layer `i` reads.
    pub fn layer_inputs(&self, i: usize, state: Residual) -> LayerInputs {
        let variant = match self {
            Self::FarSkip(f) if self.is_converted(i) => f.variant,
            // A stock layer takes R and drops A (at depth ≥ 2: waits for everything in flight).
            _ => {
                let r = state.full();
                return LayerInputs {
                    residual: r.clone(),
                    attn_in: r,
                    ffn_in: FfnInput::PostAttention,
                    in_flight: Vec::new(),
                };
            }
        };
        if let Some(depth) = self.deep() {
            return Self::deep_layer_inputs(depth, state);
        }
        // A converted layer given one tensor uses R = A = M = h; given a pair it uses M = R (pre-attention).
        let (r, a) = match state {
            Residual::Plain(h) => (h.clone(), h),
            Residual::Pair { full, routed_free } => (full, routed_free),
            // Only a deeper connectivity makes this state; read at depth 1 it is the pair (R, S).
            Residual::InFlight { settled, routed } => {
                let a = settled.clone();
                (add_all(settled, routed), a)
            }
        };
        match variant {
            FarSkipVariant::Full => LayerInputs {
                residual: r.clone(),
                attn_in: a,
                ffn_in: FfnInput::PreAttention(r),
                in_flight: Vec::new(),
            },
            FarSkipVariant::AttnOnly => LayerInputs {
                residual: r,
                attn_in: a,
                ffn_in: FfnInput::PostAttention,
                in_flight: Vec::new(),
            },
            FarSkipVariant::MlpOnly => LayerInputs {
                residual: r.clone(),
                attn_in: r.clone(),
                ffn_in: FfnInput::PreAttention(r),
                in_flight: Vec::new(),
            },
        }
    }

    /// A converted layer at skip depth `depth` ≥ 2: attention reads S; the MoE reads M = S + P[d−1] once d
    /// outputs are queued (that output settles), else M = S; the rest of the queue stays in flight.
    fn deep_layer_inputs(depth: usize, state: Residual) -> LayerInputs {
        let (settled, mut routed) = match state {
            Residual::Plain(h) => (h, Vec::new()),
            Residual::InFlight { settled, routed } => (settled, routed),
            // Only a depth-1 connectivity makes this state: S = A with R − A in flight.
            Residual::Pair { full, routed_free } => {
                let newest = full - routed_free.clone();
                (routed_free, vec![newest])
            }
        };
        let m = if routed.len() >= depth {
            let oldest = routed.split_off(depth - 1);
            add_all(settled.clone(), oldest)
        } else {
            settled.clone()
        };
        LayerInputs {
            residual: m.clone(),
            attn_in: settled,
            ffn_in: FfnInput::PreAttention(m),
            in_flight: routed,
        }
    }

    /// Output of an MoE layer, converted or not: `(R' + (r + s), R' + s)` under FarSkip (the reference hands
    /// the pair on from every MoE layer), `R' + (r + s)` otherwise. At skip depth ≥ 2: S' = R' + s with `routed`
    /// queued in front of `in_flight` (the layer's [`LayerInputs::in_flight`]).
    ///
    /// # Shapes
    /// - all inputs `[batch, seq, hidden]`
    pub fn moe_output(
        &self,
        post_attention: Tensor<3>,
        routed: Tensor<3>,
        shared: Option<Tensor<3>>,
        in_flight: Vec<Tensor<3>>,
    ) -> Residual {
        if self.deep().is_some() {
            let settled = match shared {
                Some(s) => post_attention + s,
                None => post_attention,
            };
            let mut queue = Vec::with_capacity(in_flight.len() + 1);
            queue.push(routed);
            queue.extend(in_flight);
            return Residual::InFlight {
                settled,
                routed: queue,
            };
        }
        debug_assert!(in_flight.is_empty(), "depth 1 keeps nothing in flight");
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

    /// Output of a dense layer: `R' + MLP(x)`; the routed-free stream collapses into R, and at skip depth ≥ 2
    /// everything still in flight (`in_flight`, the layer's [`LayerInputs::in_flight`]) joins it.
    pub fn dense_output(
        &self,
        post_attention: Tensor<3>,
        mlp: Tensor<3>,
        in_flight: Vec<Tensor<3>>,
    ) -> Residual {
        Residual::Plain(add_all(post_attention, in_flight) + mlp)
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
        let deep = Connectivity::FarSkip(FarSkip::all().with_depth(2));
        assert!(deep.validate(4).is_ok());
        for bad in [
            FarSkip::all().with_depth(0),
            FarSkip {
                variant: FarSkipVariant::AttnOnly,
                ..FarSkip::all().with_depth(2)
            },
            FarSkip {
                variant: FarSkipVariant::MlpOnly,
                ..FarSkip::all().with_depth(3)
            },
        ] {
            assert!(Connectivity::FarSkip(bad).validate(4).is_err());
        }
    }

    #[test]
    fn depth_round_trips_through_the_string_form() {
        for spec in [
            "farskip-d2",
            "farskip-d3:1..=3",
            "farskip-d2:2..",
            "farskip-d17",
        ] {
            let c: Connectivity = spec.parse().unwrap();
            assert_eq!(c.to_string(), spec);
            assert!(c.depth().unwrap() >= 2);
        }
        assert_eq!(
            "farskip-d3:1..=3".parse::<Connectivity>().unwrap(),
            Connectivity::FarSkip(FarSkip::range(1, 3).with_depth(3))
        );
        let d1: Connectivity = "farskip-d1".parse().unwrap();
        assert_eq!(d1, Connectivity::farskip());
        assert_eq!(d1.to_string(), "farskip");
        assert_eq!(Connectivity::Standard.depth(), None);
    }

    #[test]
    fn bad_depths_name_the_value() {
        for (spec, needle) in [
            ("farskip-d0", "at least 1"),
            ("farskip-dx", "`x` is not a skip depth"),
            ("farskip-d", "`` is not a skip depth"),
            ("farskip-d-1", "`-1` is not a skip depth"),
            ("farskip-attn-only-d2", "full variant only"),
            ("farskip-mlp-only-d3:1..=2", "full variant only"),
        ] {
            match spec.parse::<Connectivity>() {
                Err(ModelError::InvalidConnectivity { spec: s, message }) => {
                    assert_eq!(s, spec);
                    assert!(message.contains(needle), "{spec}: {message}");
                }
                other => panic!("{spec}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_in_flight_queue_follows_the_depth_rules() {
        // Depth 2, every layer converted; values chosen so each sum identifies its terms.
        let d2: Connectivity = "farskip-d2".parse().unwrap();
        // Plain input: S = h, nothing in flight, M = S.
        let li = d2.layer_inputs(0, Residual::Plain(t(1.0)));
        assert_eq!((val(&li.residual), val(&li.attn_in)), (1.0, 1.0));
        assert!(li.in_flight.is_empty());
        // One output in flight (< d): the MoE reads S, the output stays queued and moves one place back.
        let state = Residual::InFlight {
            settled: t(10.0),
            routed: vec![t(100.0)],
        };
        let li = d2.layer_inputs(1, state);
        assert_eq!((val(&li.residual), val(&li.attn_in)), (10.0, 10.0));
        assert!(matches!(li.ffn_in, FfnInput::PreAttention(ref m) if val(m) == 10.0));
        assert_eq!(li.in_flight.len(), 1);
        // S' = R' + s, P' = [r, 100].
        let post_attention = li.residual.clone() + t(0.5);
        match d2.moe_output(post_attention, t(1000.0), Some(t(0.25)), li.in_flight) {
            Residual::InFlight { settled, routed } => {
                assert_eq!(val(&settled), 10.75);
                assert_eq!(routed.iter().map(val).collect::<Vec<_>>(), [1000.0, 100.0]);
            }
            other => panic!("expected the queue, got {other:?}"),
        }
        // d outputs queued: the oldest settles into the MoE's input, the newest stays in flight.
        let state = Residual::InFlight {
            settled: t(10.0),
            routed: vec![t(1000.0), t(100.0)],
        };
        let li = d2.layer_inputs(2, state.clone());
        assert_eq!((val(&li.residual), val(&li.attn_in)), (110.0, 10.0));
        assert_eq!(li.in_flight.iter().map(val).collect::<Vec<_>>(), [1000.0]);
        // A dense layer adds everything still in flight: R + a + MLP.
        let out = d2.dense_output(li.residual.clone() + t(0.5), t(0.25), li.in_flight);
        assert_eq!(val(&out.full()), 1110.75);
        // A stock layer waits for everything: it reads R.
        let partial: Connectivity = "farskip-d2:3..".parse().unwrap();
        let li = partial.layer_inputs(2, state.clone());
        assert_eq!((val(&li.residual), val(&li.attn_in)), (1110.0, 1110.0));
        assert!(matches!(li.ffn_in, FfnInput::PostAttention));
        assert_eq!(val(&state.clone().full()), 1110.0);
        // Depth 3 with two queued: nothing settles yet.
        let d3: Connectivity = "farskip-d3".parse().unwrap();
        let li = d3.layer_inputs(2, state);
        assert_eq!((val(&li.residual), val(&li.attn_in)), (10.0, 10.0));
        assert_eq!(li.in_flight.len(), 2);
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
        match fs.moe_output(t(1.0), t(2.0), Some(t(4.0)), Vec::new()) {
            Residual::Pair { full, routed_free } => {
                assert_eq!((val(&full), val(&routed_free)), (7.0, 5.0))
            }
            other => panic!("expected a pair, got {other:?}"),
        }
        match Connectivity::Standard.moe_output(t(1.0), t(2.0), None, Vec::new()) {
            Residual::Plain(h) => assert_eq!(val(&h), 3.0),
            other => panic!("standard keeps one stream, got {other:?}"),
        }
        assert!(matches!(
            fs.dense_output(t(1.0), t(1.0), Vec::new()),
            Residual::Plain(_)
        ));
    }
}
