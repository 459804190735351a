//! [`LinkModel`]: how long a simulated collective takes on the `LocalWorld` link.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::comm::{CollectiveCall, CommError};

type PerOp = Arc<dyn Fn(&CollectiveCall, usize) -> Duration + Send + Sync>;

/// The simulated interconnect of a `LocalWorld`.
///
/// A collective completes this long after the last rank joined it; the time is spent sleeping on
/// each rank's comm thread, never on the caller's thread, so a rank computes meanwhile.
#[derive(Clone)]
pub enum LinkModel {
    /// `latency + bytes / bandwidth`, where `bytes` is the traffic on the busiest link (see
    /// [`LinkModel::duration`]).
    LatencyBandwidth {
        /// Fixed cost per collective.
        latency: Duration,
        /// Bytes per second; `f64::INFINITY` for a link with latency only.
        bandwidth_bytes_per_s: f64,
    },
    /// The caller decides each collective's duration, for example `R ×` the compute window
    /// that should hide it (the `comm_ratio` experiments of DESIGN.md §4).
    FixedTimePerOp(PerOp),
}

impl LinkModel {
    /// A latency/bandwidth link.
    pub fn new(latency: Duration, bandwidth_bytes_per_s: f64) -> Self {
        Self::LatencyBandwidth {
            latency,
            bandwidth_bytes_per_s,
        }
    }

    /// A link on which collectives take no simulated time.
    pub fn instant() -> Self {
        Self::new(Duration::ZERO, f64::INFINITY)
    }

    /// A link whose collectives take `f(call, bytes)`; `bytes` is the busiest link's traffic.
    pub fn fixed_time_per_op(
        f: impl Fn(&CollectiveCall, usize) -> Duration + Send + Sync + 'static,
    ) -> Self {
        Self::FixedTimePerOp(Arc::new(f))
    }

    /// Rejects a bandwidth that is not a positive number.
    pub fn validate(&self) -> Result<(), CommError> {
        match self {
            Self::LatencyBandwidth {
                bandwidth_bytes_per_s: bw,
                ..
            } if bw.is_nan() || *bw <= 0.0 => Err(CommError::InvalidArgument(format!(
                "link bandwidth must be positive bytes/s, got {bw}"
            ))),
            _ => Ok(()),
        }
    }

    /// The simulated duration of `call` moving `bytes` on its busiest link.
    ///
    /// `bytes` is what the backend computed from all ranks' buffers: ring all-reduce
    /// `2(n−1)/n·B`, all-gather `(n−1)·B`, reduce-scatter `(n−1)/n·B`, broadcast `B`,
    /// all-to-all-v the largest off-rank traffic of any rank, barrier 0 (`B` = one rank's
    /// buffer; a world of one moves nothing). Every rank computes the same value.
    pub fn duration(&self, call: &CollectiveCall, bytes: usize) -> Duration {
        match self {
            Self::LatencyBandwidth {
                latency,
                bandwidth_bytes_per_s,
            } => {
                let transfer = bytes as f64 / bandwidth_bytes_per_s;
                // An invalid bandwidth is refused by `validate`; saturate rather than panic.
                *latency + Duration::try_from_secs_f64(transfer).unwrap_or(Duration::ZERO)
            }
            Self::FixedTimePerOp(f) => f(call, bytes),
        }
    }
}

impl fmt::Debug for LinkModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LatencyBandwidth {
                latency,
                bandwidth_bytes_per_s,
            } => f
                .debug_struct("LatencyBandwidth")
                .field("latency", latency)
                .field("bandwidth_bytes_per_s", bandwidth_bytes_per_s)
                .finish(),
            Self::FixedTimePerOp(_) => f.write_str("FixedTimePerOp(..)"),
        }
    }
}

impl Default for LinkModel {
    fn default() -> Self {
        Self::instant()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::{CallShape, CollectiveKind, CollectiveTag};

    fn call() -> CollectiveCall {
        CollectiveCall {
            kind: CollectiveKind::AllReduce,
            tag: CollectiveTag::new("x"),
            shape: CallShape::Elements { len: 4 },
        }
    }

    #[test]
    fn latency_plus_bytes_over_bandwidth() {
        let link = LinkModel::new(Duration::from_millis(2), 1000.0);
        assert_eq!(link.duration(&call(), 500), Duration::from_millis(502));
        assert_eq!(
            LinkModel::instant().duration(&call(), 1 << 30),
            Duration::ZERO
        );
    }

    #[test]
    fn per_op_override_sees_the_call() {
        let link = LinkModel::fixed_time_per_op(|c, bytes| {
            assert_eq!(c.kind, CollectiveKind::AllReduce);
            Duration::from_micros(bytes as u64 * 10)
        });
        assert_eq!(link.duration(&call(), 3), Duration::from_micros(30));
    }

    #[test]
    fn bad_bandwidth_is_refused() {
        for bw in [0.0, -1.0, f64::NAN] {
            assert!(LinkModel::new(Duration::ZERO, bw).validate().is_err());
        }
        assert!(LinkModel::instant().validate().is_ok());
    }
}
