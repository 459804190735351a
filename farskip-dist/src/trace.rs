//! Intervals of work per rank and stream ([`Span`]), collected into a [`Trace`], plus what is
//! computed from them: the overlap metric of DESIGN.md §4 ([`overlap_pct`], [`compute_time`],
//! [`comm_time`]) and two views, Chrome trace-event JSON (opens in Perfetto) and an SVG
//! timeline.
//!
//! Recording is cheap when the trace is disabled (one branch, no clock read). Each recorded span
//! is also emitted as a `tracing` event (target `farskip_dist::trace`) with the same fields.
//! The metrics live in `overlap`, the views in `chrome` and `svg`.

mod chrome;
mod overlap;
mod svg;

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use overlap::{
    comm_time, compute_time, exposed_comm_time, hidden_comm_time, overlap_pct, peer_wait_time,
    wall_time,
};

/// Which stream of a rank a span ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Stream {
    /// Model compute (attention, experts, router, ...).
    Compute,
    /// A collective in flight.
    Comm,
}

impl Stream {
    /// `"compute"` or `"comm"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Compute => "compute",
            Self::Comm => "comm",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The pass a span belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
pub enum Phase {
    /// The forward pass (and inference).
    #[default]
    Forward,
    /// The backward pass.
    Backward,
}

impl Phase {
    /// `"forward"` or `"backward"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Backward => "backward",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One interval of work on one rank's stream. Times are offsets from the trace's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The rank.
    pub rank: usize,
    /// Compute or comm.
    pub stream: Stream,
    /// The decoder layer, if any.
    pub layer: Option<usize>,
    /// What ran (`"attn_1"`, `"experts"`, `"dispatch"`, ...).
    pub op: Cow<'static, str>,
    /// Forward or backward.
    pub phase: Phase,
    /// Start, from the trace's epoch.
    pub start: Duration,
    /// End, from the trace's epoch (`end >= start`).
    pub end: Duration,
    /// Comm spans: when this rank issued the collective. `None` for compute spans.
    pub issued: Option<Duration>,
    /// Comm spans: when the last rank issued the collective. The transfer (`start..end`) cannot begin before
    /// (it also waits for the rank's link to finish its previous transfer), so `all_issued − issued` is how
    /// long this rank's collective waited for its peers ([`peer_wait_time`]). `None` for compute spans.
    pub all_issued: Option<Duration>,
}

impl Span {
    /// `end - start` (zero if the span is reversed).
    pub fn duration(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }

    /// Comm spans: how long this rank's collective waited for its last peer to issue it
    /// (`all_issued − issued`); `None` without issue times.
    pub fn peer_wait(&self) -> Option<Duration> {
        Some(self.all_issued?.saturating_sub(self.issued?))
    }

    /// `op` or `op L<layer>`, as shown in the views.
    pub fn label(&self) -> String {
        match self.layer {
            Some(layer) => format!("{} L{layer}", self.op),
            None => self.op.to_string(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    spans: Mutex<Vec<Span>>,
}

/// A thread-safe collection of spans from all ranks. Clones share the same collection.
#[derive(Clone, Default)]
pub struct Trace {
    inner: Option<Arc<Inner>>,
}

impl Trace {
    /// An enabled, empty trace whose epoch is now.
    pub fn new() -> Self {
        Self::from_spans(Vec::new())
    }

    /// A trace that records nothing.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// An enabled trace holding `spans` (for hand-built or loaded intervals).
    pub fn from_spans(spans: Vec<Span>) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                epoch: Instant::now(),
                spans: Mutex::new(spans),
            })),
        }
    }

    /// Whether spans are kept.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Time since the epoch (zero, without reading the clock, when disabled).
    pub fn now(&self) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |i| i.epoch.elapsed())
    }

    /// The offset of `at` from the epoch (zero for instants before it).
    pub fn offset_of(&self, at: Instant) -> Duration {
        self.inner
            .as_ref()
            .map_or(Duration::ZERO, |i| at.saturating_duration_since(i.epoch))
    }

    /// Adds `span` and emits it as a `tracing` event. Does nothing when disabled.
    pub fn record(&self, span: Span) {
        let Some(inner) = &self.inner else { return };
        tracing::trace!(
            target: "farskip_dist::trace",
            rank = span.rank,
            stream = span.stream.name(),
            layer = span.layer,
            op = %span.op,
            phase = span.phase.name(),
            start_us = span.start.as_secs_f64() * 1e6,
            dur_us = span.duration().as_secs_f64() * 1e6,
            "span"
        );
        inner
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(span);
    }

    /// Starts a span on `stream` that is recorded when the guard is dropped or finished.
    pub fn span(
        &self,
        rank: usize,
        stream: Stream,
        layer: Option<usize>,
        op: impl Into<Cow<'static, str>>,
        phase: Phase,
    ) -> SpanGuard {
        if !self.is_enabled() {
            return SpanGuard { open: None };
        }
        SpanGuard {
            open: Some((
                self.clone(),
                Span {
                    rank,
                    stream,
                    layer,
                    op: op.into(),
                    phase,
                    start: self.now(),
                    end: Duration::ZERO,
                    issued: None,
                    all_issued: None,
                },
            )),
        }
    }

    /// Starts a compute span (see [`Trace::span`]).
    pub fn compute(
        &self,
        rank: usize,
        layer: Option<usize>,
        op: impl Into<Cow<'static, str>>,
        phase: Phase,
    ) -> SpanGuard {
        self.span(rank, Stream::Compute, layer, op, phase)
    }

    /// A copy of all spans, sorted by rank, stream and start.
    pub fn spans(&self) -> Vec<Span> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        let mut spans = inner
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        spans.sort_by_key(|s| (s.rank, s.stream, s.start));
        spans
    }

    /// Removes all spans (the epoch stays).
    pub fn clear(&self) {
        if let Some(inner) = &self.inner {
            inner
                .spans
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// The spans in Chrome trace-event format: `pid` = rank, `tid` = stream (0 compute,
    /// 1 comm), times in microseconds. Opens in Perfetto and `chrome://tracing`.
    pub fn to_chrome_json(&self) -> String {
        chrome::to_chrome_json(&self.spans())
    }

    /// An SVG timeline: per rank a compute lane and a comm lane, one box per span labelled with
    /// its op and layer, a time axis in milliseconds, and `title` on top.
    pub fn to_svg(&self, title: &str) -> String {
        svg::to_svg(&self.spans(), title)
    }
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Trace(disabled)"),
            Some(inner) => {
                let n = inner
                    .spans
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len();
                write!(f, "Trace({n} spans)")
            }
        }
    }
}

/// Compute spans of a collective's host work on one rank: [`crate::schedule::ops::pack`] of its tag while its
/// send buffer is built, [`crate::schedule::ops::unpack`] while what arrived is taken apart. Nothing for a
/// disabled trace or a tag that is not one of the schedules' collectives.
#[derive(Clone)]
pub(crate) struct HostSpans {
    trace: Trace,
    rank: usize,
    layer: Option<usize>,
    phase: Phase,
    pack: Option<&'static str>,
    unpack: Option<&'static str>,
}

impl HostSpans {
    /// The host work of collective `tag` on `rank`, traced on `trace`.
    pub(crate) fn new(trace: &Trace, rank: usize, tag: &crate::comm::CollectiveTag) -> Self {
        Self {
            trace: trace.clone(),
            rank,
            layer: tag.layer,
            phase: tag.phase,
            pack: crate::schedule::ops::pack(&tag.name),
            unpack: crate::schedule::ops::unpack(&tag.name),
        }
    }

    /// Runs `f`, the packing of the send buffer, in its span.
    pub(crate) fn pack<T>(&self, f: impl FnOnce() -> T) -> T {
        self.run(self.pack, f)
    }

    /// Runs `f`, the unpacking of what arrived, in its span.
    pub(crate) fn unpack<T>(&self, f: impl FnOnce() -> T) -> T {
        self.run(self.unpack, f)
    }

    fn run<T>(&self, op: Option<&'static str>, f: impl FnOnce() -> T) -> T {
        match op {
            Some(op) if self.trace.is_enabled() => {
                let g = self.trace.compute(self.rank, self.layer, op, self.phase);
                let out = f();
                g.finish();
                out
            }
            _ => f(),
        }
    }
}

/// An open span; it is recorded when finished or dropped.
#[must_use = "the span ends when this guard is dropped; bind it to a variable"]
#[derive(Debug)]
pub struct SpanGuard {
    open: Option<(Trace, Span)>,
}

impl SpanGuard {
    /// Ends the span now.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for SpanGuard {
    fn drop(&mut self) {
        if let Some((trace, mut span)) = self.open.take() {
            span.end = trace.now();
            trace.record(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_trace_records_nothing() {
        let t = Trace::disabled();
        t.compute(0, Some(1), "attn", Phase::Forward).finish();
        assert!(t.spans().is_empty());
        assert_eq!(t.now(), Duration::ZERO);
    }

    #[test]
    fn guards_record_on_drop_and_clones_share() {
        let t = Trace::new();
        let shared = t.clone();
        {
            let _g = shared.compute(2, Some(0), "experts", Phase::Backward);
            std::thread::sleep(Duration::from_millis(2));
        }
        let spans = t.spans();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].rank, 2);
        assert_eq!(spans[0].label(), "experts L0");
        assert!(spans[0].duration() >= Duration::from_millis(2));
    }
}
