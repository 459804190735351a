//! Chrome trace-event JSON (the format Perfetto and `chrome://tracing` open): one complete
//! event (`"ph": "X"`) per span, `pid` = rank, `tid` = stream, plus name metadata per lane.

use serde_json::{Value, json};

use super::{Span, Stream};

fn tid(stream: Stream) -> u64 {
    match stream {
        Stream::Compute => 0,
        Stream::Comm => 1,
    }
}

pub(super) fn to_chrome_json(spans: &[Span]) -> String {
    let mut ranks: Vec<usize> = spans.iter().map(|s| s.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();

    let mut events: Vec<Value> = Vec::with_capacity(spans.len() + 3 * ranks.len());
    for &rank in &ranks {
        events.push(json!({
            "name": "process_name", "ph": "M", "pid": rank, "tid": 0,
            "args": { "name": format!("rank {rank}") },
        }));
        for stream in [Stream::Compute, Stream::Comm] {
            events.push(json!({
                "name": "thread_name", "ph": "M", "pid": rank, "tid": tid(stream),
                "args": { "name": stream.name() },
            }));
        }
    }
    for s in spans {
        events.push(json!({
            "name": s.label(),
            "cat": s.stream.name(),
            "ph": "X",
            "ts": s.start.as_secs_f64() * 1e6,
            "dur": s.duration().as_secs_f64() * 1e6,
            "pid": s.rank,
            "tid": tid(s.stream),
            "args": {
                "op": s.op,
                "layer": s.layer,
                "phase": s.phase.name(),
                "waited_for_peers_ms": s.peer_wait().map(|w| w.as_secs_f64() * 1e3),
            },
        }));
    }
    json!({ "traceEvents": events, "displayTimeUnit": "ms" }).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::trace::{Phase, Trace};

    #[test]
    fn events_carry_rank_stream_and_times() -> Result<(), serde_json::Error> {
        let trace = Trace::from_spans(vec![Span {
            rank: 1,
            stream: Stream::Comm,
            layer: Some(3),
            op: "combine".into(),
            phase: Phase::Backward,
            start: Duration::from_micros(1500),
            end: Duration::from_micros(2000),
            issued: Some(Duration::from_micros(1250)),
            all_issued: Some(Duration::from_micros(1400)),
        }]);
        let v: Value = serde_json::from_str(&trace.to_chrome_json())?;
        let events = v["traceEvents"].as_array().cloned().unwrap_or_default();
        let x: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(x.len(), 1);
        assert_eq!(x[0]["name"], "combine L3");
        assert_eq!(x[0]["pid"], 1);
        assert_eq!(x[0]["tid"], 1);
        assert_eq!(x[0]["ts"], 1500.0);
        assert_eq!(x[0]["dur"], 500.0);
        assert_eq!(x[0]["args"]["phase"], "backward");
        assert_eq!(x[0]["args"]["waited_for_peers_ms"], 0.15);
        let names = events.iter().filter(|e| e["name"] == "thread_name").count();
        assert_eq!(names, 2);
        Ok(())
    }
}
