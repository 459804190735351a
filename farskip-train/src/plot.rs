//! Loss-curve plots (SVG) and training progress output.
//!
//! [`loss_curves_svg`] draws validation loss against step, one coloured line per run, with a legend.
//! [`ProgressReporter`] shows an indicatif bar when stderr is a terminal and plain `step/total loss lr elapsed`
//! lines every N steps otherwise (logs, CI). What does not live here: collecting the numbers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use thiserror::Error;

/// Errors while plotting.
#[derive(Debug, Error)]
pub enum PlotError {
    /// No series were given.
    #[error("cannot plot {path}: no series given")]
    NoSeries {
        /// The output file.
        path: PathBuf,
    },
    /// A series has no finite point.
    #[error("cannot plot {path}: series {name:?} has no finite (step, loss) point")]
    EmptySeries {
        /// The output file.
        path: PathBuf,
        /// The series at fault.
        name: String,
    },
    /// plotters failed to draw or write the file.
    #[error("cannot draw {path}: {message}")]
    Draw {
        /// The output file.
        path: PathBuf,
        /// plotters' message.
        message: String,
    },
}

/// Line colours, one per run (Tableau 10, then four darker tones), reused cyclically.
const COLOURS: [RGBColor; 14] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(128, 0, 0),
    RGBColor(0, 77, 64),
    RGBColor(60, 0, 130),
];

/// Writes an SVG of validation loss (y) against step (x), one line and legend entry per `(name, points)` series.
///
/// Non-finite points are skipped; a series with none left is an error.
pub fn loss_curves_svg<S: AsRef<str>>(
    path: impl AsRef<Path>,
    title: &str,
    series: &[(S, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    line_chart_svg(path, title, ("step", "validation loss"), series)
}

/// Writes an SVG line chart with the given axis labels `(x, y)`, one line and legend entry per series.
///
/// Non-finite points are skipped; a series with none left is an error.
pub fn line_chart_svg<S: AsRef<str>>(
    path: impl AsRef<Path>,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(S, Vec<(f64, f64)>)],
) -> Result<(), PlotError> {
    let panel = Panel {
        title: title.to_owned(),
        x_desc: x_desc.to_owned(),
        y_desc: y_desc.to_owned(),
        lines: series
            .iter()
            .enumerate()
            .map(|(i, (name, points))| Line {
                name: name.as_ref().to_owned(),
                points: points.clone(),
                stroke: Stroke::Solid,
                colour: i,
            })
            .collect(),
    };
    draw_panels(path.as_ref(), None, &[panel], (960, 600))
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stroke {
    /// A measured series.
    Solid,
    /// A bound or reference (e.g. what perfect hiding would give).
    Dashed,
}

/// One line of a [`Panel`].
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Solid or dashed.
    pub stroke: Stroke,
    /// Index into the palette, so a bound can share its series' colour.
    pub colour: usize,
}

/// One chart of a figure made of side-by-side panels.
#[derive(Clone, Debug)]
pub struct Panel {
    /// The chart's caption.
    pub title: String,
    /// X axis label.
    pub x_desc: String,
    /// Y axis label.
    pub y_desc: String,
    /// The lines; a panel needs at least one, each with at least one finite point.
    pub lines: Vec<Line>,
}

/// Writes an SVG of `panels` side by side under one `title`.
pub fn panels_svg(path: impl AsRef<Path>, title: &str, panels: &[Panel]) -> Result<(), PlotError> {
    draw_panels(
        path.as_ref(),
        Some(title),
        panels,
        (720 * panels.len().max(1) as u32, 600),
    )
}

fn draw_panels(
    path: &Path,
    title: Option<&str>,
    panels: &[Panel],
    size: (u32, u32),
) -> Result<(), PlotError> {
    if panels.is_empty() || panels.iter().any(|p| p.lines.is_empty()) {
        return Err(PlotError::NoSeries {
            path: path.to_owned(),
        });
    }
    let mut finite_panels = Vec::with_capacity(panels.len());
    for panel in panels {
        let mut lines = Vec::with_capacity(panel.lines.len());
        for line in &panel.lines {
            let kept: Vec<_> = line
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            if kept.is_empty() {
                return Err(PlotError::EmptySeries {
                    path: path.to_owned(),
                    name: line.name.clone(),
                });
            }
            lines.push((line, kept));
        }
        finite_panels.push((panel, lines));
    }
    let draw_err = |e: &dyn std::error::Error| PlotError::Draw {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let root = match title {
        Some(t) => root
            .titled(t, ("sans-serif", 26))
            .map_err(|e| draw_err(&e))?,
        None => root,
    };
    let areas = root.split_evenly((1, finite_panels.len()));
    for (area, (panel, lines)) in areas.iter().zip(finite_panels) {
        let all = lines.iter().flat_map(|(_, points)| points);
        let (x_range, y_range) = (
            padded_range(all.clone().map(|p| p.0)),
            padded_range(all.map(|p| p.1)),
        );
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| draw_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(&panel.x_desc)
            .y_desc(&panel.y_desc)
            .draw()
            .map_err(|e| draw_err(&e))?;
        for (line, points) in lines {
            let colour = COLOURS[line.colour % COLOURS.len()];
            let style = colour.stroke_width(2);
            let drawn = match line.stroke {
                Stroke::Solid => chart.draw_series(LineSeries::new(points, style)),
                Stroke::Dashed => chart.draw_series(DashedLineSeries::new(points, 6, 5, style)),
            };
            drawn
                .map_err(|e| draw_err(&e))?
                .label(&line.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(&e))?;
    }
    root.present().map_err(|e| draw_err(&e))
}

/// `min..max` of the values with 5% padding; a single value gets a unit-wide range around it.
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    (lo - pad)..(hi + pad)
}

/// Training progress: an indicatif bar on a terminal, plain lines every N steps otherwise.
#[derive(Debug)]
pub struct ProgressReporter {
    total: usize,
    every: usize,
    start: Instant,
    bar: Option<ProgressBar>,
    label: String,
}

/// Bars drawn right now: a second concurrent run (the recipe trains its baselines side by side) prints
/// labelled plain lines instead of a bar that would overwrite the first one.
static ACTIVE_BARS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ProgressReporter {
    /// A bar if stderr is a terminal, else a plain line every `every` steps (and at the last step).
    pub fn new(total_steps: usize, every: usize) -> Self {
        if std::io::stderr().is_terminal()
            && ACTIVE_BARS.load(std::sync::atomic::Ordering::SeqCst) == 0
        {
            Self::bar(total_steps)
        } else {
            Self::plain(total_steps, every)
        }
    }

    /// The same reporter with every line (or the bar's message) prefixed by `[label]`.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Plain `eprintln!` lines every `every` steps (at least 1) and at the last step, whatever stderr is.
    pub fn plain(total_steps: usize, every: usize) -> Self {
        Self {
            total: total_steps,
            every: every.max(1),
            start: Instant::now(),
            bar: None,
            label: String::new(),
        }
    }

    /// An indicatif bar on stderr, whatever stderr is.
    pub fn bar(total_steps: usize) -> Self {
        let style =
            ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} [{elapsed_precise} < {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::new(total_steps as u64).with_style(style);
        ACTIVE_BARS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self {
            total: total_steps,
            every: 1,
            start: Instant::now(),
            bar: Some(bar),
            label: String::new(),
        }
    }

    /// Reports that `step` (1-based) finished with this loss and learning rate.
    pub fn update(&self, step: usize, loss: f64, lr: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step as u64);
                bar.set_message(format!("{}loss {loss:.4} lr {lr:.2e}", self.prefix()));
            }
            None if self.should_print(step) => {
                eprintln!(
                    "{}{}",
                    self.prefix(),
                    progress_line(step, self.total, loss, lr, self.start.elapsed())
                );
            }
            None => {}
        }
    }

    /// Whether plain mode prints a line at `step`.
    pub fn should_print(&self, step: usize) -> bool {
        step.is_multiple_of(self.every) || step == self.total
    }

    fn prefix(&self) -> String {
        if self.label.is_empty() {
            String::new()
        } else {
            format!("[{}] ", self.label)
        }
    }

    /// Closes the bar (plain mode prints nothing more).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        if self.bar.is_some() {
            ACTIVE_BARS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// One plain progress line: `step 120/1000 loss 2.3456 lr 1.00e-4 elapsed 12.3s`.
pub fn progress_line(step: usize, total: usize, loss: f64, lr: f64, elapsed: Duration) -> String {
    format!(
        "step {step}/{total} loss {loss:.4} lr {lr:.2e} elapsed {:.1}s",
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_every_series_name() {
        let dir = std::env::temp_dir().join(format!("farskip-train-{}-plot", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("curves.svg");
        let series = [
            ("fcsd_kl", vec![(0.0, 3.0), (100.0, 1.5), (200.0, 1.1)]),
            (
                "sft_baseline",
                vec![(0.0, 3.0), (100.0, 2.2), (200.0, f64::NAN), (300.0, 2.0)],
            ),
        ];
        loss_curves_svg(&path, "FCSD recovery", &series).expect("plots");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for needle in [
            "fcsd_kl",
            "sft_baseline",
            "FCSD recovery",
            "validation loss",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn rejects_missing_data() {
        let no_series: [(&str, Vec<(f64, f64)>); 0] = [];
        assert!(matches!(
            loss_curves_svg("x.svg", "t", &no_series),
            Err(PlotError::NoSeries { .. })
        ));
        let err = loss_curves_svg(
            "x.svg",
            "t",
            &[("ok", vec![(0.0, 1.0)]), ("bad", vec![(1.0, f64::NAN)])],
        );
        assert_eq!(
            err.expect_err("no finite point").to_string(),
            "cannot plot x.svg: series \"bad\" has no finite (step, loss) point"
        );
    }

    #[test]
    fn padded_range_handles_a_single_value() {
        assert_eq!(padded_range([2.0].into_iter()), 1.5..2.5);
        let r = padded_range([0.0, 10.0, 5.0].into_iter());
        assert!((r.start + 0.5).abs() < 1e-12 && (r.end - 10.5).abs() < 1e-12);
    }

    #[test]
    fn plain_progress_lines() {
        let reporter = ProgressReporter::plain(250, 100);
        let printed: Vec<usize> = (1..=250).filter(|&s| reporter.should_print(s)).collect();
        assert_eq!(printed, vec![100, 200, 250]);
        assert_eq!(
            progress_line(120, 1000, 2.345_67, 1e-4, Duration::from_millis(12_340)),
            "step 120/1000 loss 2.3457 lr 1.00e-4 elapsed 12.3s"
        );
        assert!(
            ProgressReporter::plain(10, 0).should_print(3),
            "every = 0 means every step"
        );
    }
}
