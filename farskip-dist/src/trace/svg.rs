//! A hand-written SVG timeline: a title, per rank a compute lane and a comm lane with one box
//! per span (colour by op, lighter for backward, label "op Lk" when it fits, tooltip with the
//! exact times), a thin grey bar on the comm lane where a collective waited for a later rank to
//! issue it, and a time axis in milliseconds.

use std::fmt::Write;
use std::time::Duration;

use super::{Phase, Span, Stream};

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 130.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 56.0;
const LANE: f64 = 22.0;
const LANE_GAP: f64 = 4.0;
const RANK_GAP: f64 = 14.0;
const AXIS: f64 = 44.0;
const FONT: &str = "font-family=\"sans-serif\"";

const COMPUTE_COLOURS: [&str; 6] = [
    "#4c78a8", "#54a24b", "#72b7b2", "#8e6bb8", "#3b8bc2", "#88a33d",
];
const COMM_COLOURS: [&str; 4] = ["#e45756", "#f58518", "#d6616b", "#e6a117"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// FNV-1a, so colours are stable across runs.
fn hash(s: &str) -> usize {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) as usize
}

fn colour(span: &Span) -> &'static str {
    match span.stream {
        Stream::Compute => COMPUTE_COLOURS[hash(&span.op) % COMPUTE_COLOURS.len()],
        Stream::Comm => COMM_COLOURS[hash(&span.op) % COMM_COLOURS.len()],
    }
}

/// A tick step of 1, 2 or 5 × 10^k milliseconds giving about eight ticks.
fn tick_step_ms(range_ms: f64) -> f64 {
    let raw = (range_ms / 8.0).max(1e-6);
    let base = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * base)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * base)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) fn to_svg(spans: &[Span], title: &str) -> String {
    let mut ranks: Vec<usize> = spans.iter().map(|s| s.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();

    let t0 = spans
        .iter()
        .map(|s| ms(s.start))
        .fold(f64::INFINITY, f64::min);
    let t1 = spans.iter().map(|s| ms(s.end)).fold(0.0, f64::max);
    let t0 = if t0.is_finite() { t0.min(t1) } else { 0.0 };
    let range = (t1 - t0).max(1e-3);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x_of = |t: f64| LEFT + (t - t0) / range * plot_w;

    let rank_h = 2.0 * LANE + LANE_GAP + RANK_GAP;
    let height = TOP + rank_h * ranks.len() as f64 + AXIS;
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason only.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" {FONT} font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="{}" y="42" {FONT} font-size="11" fill="#555" text-anchor="middle">blue/green: compute, red/orange: comm; lighter boxes: backward; grey bar: waiting for a later rank to issue the collective</text>"##,
        WIDTH / 2.0
    );

    for (i, &rank) in ranks.iter().enumerate() {
        let y0 = TOP + rank_h * i as f64;
        for (lane, stream) in [Stream::Compute, Stream::Comm].into_iter().enumerate() {
            let y = y0 + lane as f64 * (LANE + LANE_GAP);
            let _ = writeln!(
                out,
                r##"<rect x="{LEFT}" y="{y}" width="{plot_w}" height="{LANE}" fill="#f3f3f3"/>"##
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" {FONT} font-size="12" text-anchor="end">rank {rank} {}</text>"#,
                LEFT - 8.0,
                y + LANE * 0.7,
                stream.name()
            );
            for s in spans
                .iter()
                .filter(|s| s.rank == rank && s.stream == stream)
            {
                if let (Some(own), Some(wait)) = (s.issued, s.peer_wait())
                    && !wait.is_zero()
                {
                    let (x0, x1) = (x_of(ms(own)).max(LEFT), x_of(ms(own + wait)));
                    write_wait(&mut out, s, wait, x0, x1, y);
                }
                write_box(&mut out, s, x_of(ms(s.start)), x_of(ms(s.end)), y);
            }
        }
    }

    let axis_y = TOP + rank_h * ranks.len() as f64 + 4.0;
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="black"/>"#,
        LEFT + plot_w
    );
    let step = tick_step_ms(range);
    let mut tick = (t0 / step).ceil() * step;
    while tick <= t1 + 1e-9 {
        let x = x_of(tick);
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" {FONT} font-size="11" text-anchor="middle">{}</text>"#,
            axis_y + 5.0,
            axis_y + 18.0,
            format_ms(tick, step)
        );
        tick += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" {FONT} font-size="12" text-anchor="middle">time (ms)</text>"#,
        LEFT + plot_w / 2.0,
        axis_y + 36.0
    );
    out.push_str("</svg>\n");
    out
}

fn format_ms(t: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{t:.decimals$}")
}

/// The time a collective waited for a later rank: a thin grey bar along the bottom of the comm lane.
fn write_wait(out: &mut String, s: &Span, wait: Duration, x0: f64, x1: f64, y: f64) {
    let h = LANE / 4.0;
    let _ = write!(
        out,
        r##"<g><title>rank {} {} [{}]: waiting for a later rank {:.3} ms</title><rect x="{x0:.2}" y="{:.2}" width="{:.2}" height="{h}" fill="#9a9a9a"/></g>"##,
        s.rank,
        escape(&s.label()),
        s.phase.name(),
        ms(wait),
        y + LANE - h,
        (x1 - x0).max(0.5),
    );
    out.push('\n');
}

fn write_box(out: &mut String, s: &Span, x0: f64, x1: f64, y: f64) {
    let w = (x1 - x0).max(0.5);
    let opacity = match s.phase {
        Phase::Forward => 1.0,
        Phase::Backward => 0.55,
    };
    let label = s.label();
    let _ = write!(
        out,
        r#"<g><title>rank {} {} {} [{}]: {:.3}–{:.3} ms ({:.3} ms){}</title><rect x="{x0:.2}" y="{y}" width="{w:.2}" height="{LANE}" fill="{}" fill-opacity="{opacity}" stroke="white" stroke-width="0.5"/>"#,
        s.rank,
        s.stream.name(),
        escape(&label),
        s.phase.name(),
        ms(s.start),
        ms(s.end),
        ms(s.duration()),
        s.issued
            .zip(s.all_issued)
            .map_or_else(String::new, |(own, last)| format!(
                ", issued at {:.3} ms, last rank at {:.3} ms",
                ms(own),
                ms(last)
            )),
        colour(s)
    );
    // About 6.5 px per character at font-size 11.
    let fits = (w / 6.5).floor() as usize;
    if fits >= 3 {
        let text: String = if label.chars().count() <= fits {
            label
        } else {
            let mut t: String = label.chars().take(fits.saturating_sub(1)).collect();
            t.push('…');
            t
        };
        let _ = write!(
            out,
            r#"<text x="{:.2}" y="{}" {FONT} font-size="11" fill="white">{}</text>"#,
            x0 + 3.0,
            y + LANE * 0.68,
            escape(&text)
        );
    }
    out.push_str("</g>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    fn span(rank: usize, stream: Stream, op: &'static str, start: u64, end: u64) -> Span {
        Span {
            rank,
            stream,
            layer: Some(2),
            op: op.into(),
            phase: Phase::Forward,
            start: Duration::from_millis(start),
            end: Duration::from_millis(end),
            issued: None,
            all_issued: None,
        }
    }

    #[test]
    fn lanes_boxes_axis_and_title() {
        let trace = Trace::from_spans(vec![
            span(0, Stream::Compute, "attn_1", 0, 40),
            span(0, Stream::Comm, "dispatch", 10, 30),
            span(1, Stream::Compute, "experts<&>", 5, 50),
        ]);
        let svg = trace.to_svg("EP <forward>");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("EP &lt;forward&gt;"));
        for lane in [
            "rank 0 compute",
            "rank 0 comm",
            "rank 1 compute",
            "rank 1 comm",
        ] {
            assert!(svg.contains(lane), "missing lane {lane}");
        }
        assert!(svg.contains(">attn_1 L2<"));
        assert!(svg.contains(">dispatch L2<"));
        assert!(svg.contains("experts&lt;&amp;&gt;"));
        assert!(svg.contains("time (ms)"));
        assert_eq!(svg.matches("<g>").count(), 3);
        assert!(
            !svg.contains("]: waiting for a later rank"),
            "no wait without issue times"
        );
    }

    #[test]
    fn a_collective_that_waited_for_a_peer_gets_a_wait_bar() {
        let waited = Span {
            issued: Some(Duration::from_millis(4)),
            all_issued: Some(Duration::from_millis(10)),
            ..span(0, Stream::Comm, "combine", 10, 30)
        };
        let last = Span {
            issued: Some(Duration::from_millis(10)),
            all_issued: Some(Duration::from_millis(10)),
            ..span(1, Stream::Comm, "combine", 10, 30)
        };
        let svg = Trace::from_spans(vec![
            span(0, Stream::Compute, "attn_1", 0, 12),
            waited,
            last,
        ])
        .to_svg("wait");
        assert_eq!(
            svg.matches("waiting for a later rank 6.000 ms").count(),
            1,
            "{svg}"
        );
        assert!(svg.contains("issued at 4.000 ms, last rank at 10.000 ms"));
    }

    #[test]
    fn empty_trace_is_still_a_document() {
        let svg = Trace::new().to_svg("nothing");
        assert!(svg.contains("nothing") && svg.contains("</svg>"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step_ms(100.0), 20.0);
        assert_eq!(tick_step_ms(8.0), 1.0);
        assert!((tick_step_ms(0.5) - 0.1).abs() < 1e-12);
    }
}
