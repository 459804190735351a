//! The conversion sweep (the paper's first experiment): convert 0, 25, 50, 75 and 100 % of a model's layers to
//! FarSkip, counted from the first layer and from the last, without any training, and measure perplexity, top-1
//! agreement and KL against the standard model on a corpus. What does not live here: the plot's drawing
//! ([`crate::plot`]) and the metrics ([`crate::evaluate`]).

use std::path::Path;

use burn::prelude::*;
use farskip_model::{Connectivity, FarSkip, Model};
use serde::{Deserialize, Serialize};

use crate::data::{BatchShape, DataError, ValidationSet};
use crate::eval::{TeacherLogits, evaluate};
use crate::plot::{PlotError, line_chart_svg};

/// The shares of layers the sweep converts, in percent.
pub const SWEEP_PERCENTS: [usize; 5] = [0, 25, 50, 75, 100];

/// Which end of the stack the converted layers are counted from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepFrom {
    /// Layers `0 ..= n − 1`.
    Start,
    /// Layers `L − n ..= L − 1`.
    End,
}

/// One converted setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSetting {
    /// Counted from the first or the last layer.
    pub from: SweepFrom,
    /// Share of the layers converted, in percent.
    pub percent: usize,
    /// The converted layers, `a..=b` (`none` at 0 %).
    pub layers: String,
    /// Perplexity on the corpus.
    pub ppl: f64,
    /// Top-1 agreement with the standard model.
    pub agreement: f64,
    /// Mean per-token KL(standard ‖ converted).
    pub kl: f64,
}

/// The sweep's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Perplexity of the standard model.
    pub standard_ppl: f64,
    /// From the start (0 … 100 %), then from the end.
    pub settings: Vec<SweepSetting>,
    /// Target tokens every setting was measured on.
    pub eval_tokens: usize,
}

/// The connectivity that converts `percent` % of `num_layers` layers (rounded to the nearest layer) counted from
/// `from`, and the converted range as `a..=b` (`none` when no layer is).
pub fn sweep_connectivity(
    num_layers: usize,
    from: SweepFrom,
    percent: usize,
) -> (Connectivity, String) {
    let n = ((num_layers * percent) as f64 / 100.0).round() as usize;
    let n = n.min(num_layers);
    if n == 0 {
        return (Connectivity::Standard, "none".into());
    }
    let (a, b) = match from {
        SweepFrom::Start => (0, n - 1),
        SweepFrom::End => (num_layers - n, num_layers - 1),
    };
    (
        Connectivity::FarSkip(FarSkip::range(a, b)),
        format!("{a}..={b}"),
    )
}

/// The last `max_windows` windows of `seq_len` tokens of `tokens` (the tail, which the recipe holds out of
/// training), 8 per batch; fewer when the stream is shorter.
pub fn sweep_windows(
    tokens: Vec<u32>,
    seq_len: usize,
    max_windows: usize,
) -> Result<ValidationSet, DataError> {
    let shape = BatchShape::new(seq_len, seq_len * 8)?;
    let needed = max_windows.max(1) * seq_len + 1;
    let tail = tokens[tokens.len().saturating_sub(needed)..].to_vec();
    Ok(ValidationSet::new(tail, shape)?.truncated(max_windows))
}

/// Runs the sweep of `model` (its weights; its own connectivity is ignored) over `windows`.
pub fn run_sweep(
    model: &Model,
    windows: &ValidationSet,
    device: &Device,
) -> Result<SweepReport, farskip_model::ModelError> {
    let standard = model.clone().with_connectivity(Connectivity::Standard)?;
    let reference = TeacherLogits::new(&standard, windows, device);
    let standard_eval = evaluate(&standard, windows, None, device);
    let layers = model.config().num_layers();
    let mut settings = Vec::new();
    for from in [SweepFrom::Start, SweepFrom::End] {
        for percent in SWEEP_PERCENTS {
            let (c, range) = sweep_connectivity(layers, from, percent);
            let m = model.clone().with_connectivity(c)?;
            let e = evaluate(&m, windows, Some(&reference), device);
            settings.push(SweepSetting {
                from,
                percent,
                layers: range,
                ppl: e.ppl,
                agreement: e.agreement.unwrap_or(f64::NAN),
                kl: e.kl.unwrap_or(f64::NAN),
            });
        }
    }
    Ok(SweepReport {
        standard_ppl: standard_eval.ppl,
        settings,
        eval_tokens: windows.num_targets(),
    })
}

impl SweepReport {
    /// The one-line JSON form: `{"standard_ppl": …, "settings": [{"from", "percent", "layers", "ppl",
    /// "agreement", "kl"}, …], "eval_tokens": …}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "standard perplexity {:.3}\n\n| from | converted | layers | perplexity | top-1 agreement | KL |\n|---|---|---|---|---|---|\n",
            self.standard_ppl
        );
        for r in &self.settings {
            s.push_str(&format!(
                "| {} | {} % | {} | {:.3} | {:.4} | {:.4} |\n",
                match r.from {
                    SweepFrom::Start => "start",
                    SweepFrom::End => "end",
                },
                r.percent,
                r.layers,
                r.ppl,
                r.agreement,
                r.kl
            ));
        }
        s
    }

    /// Writes the SVG plot: top-1 agreement with the standard model against the share of layers converted, one
    /// line counted from the first layer and one from the last.
    pub fn svg(&self, path: &Path, title: &str) -> Result<(), PlotError> {
        let series: Vec<(&str, Vec<(f64, f64)>)> = [
            (SweepFrom::Start, "from the first layer"),
            (SweepFrom::End, "from the last layer"),
        ]
        .into_iter()
        .map(|(from, name)| {
            (
                name,
                self.settings
                    .iter()
                    .filter(|s| s.from == from)
                    .map(|s| (s.percent as f64, s.agreement))
                    .collect(),
            )
        })
        .collect();
        line_chart_svg(
            path,
            title,
            (
                "layers converted (%)",
                "top-1 agreement with the standard model",
            ),
            &series,
        )
    }
}
