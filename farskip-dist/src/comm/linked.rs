//! [`LinkedComm`]: the [`LinkModel`] of `LocalWorld` over any communicator, so that a real
//! transport (MPI between processes) gets a controlled link and the overlap experiments calibrate
//! it with `comm_ratio` the same way.
//!
//! The inner communicator moves the data; a link thread per communicator then holds each result
//! until the link model says it arrives: the transfer starts when the inner collective completed
//! (every rank had issued it) or when this rank's previous transfer ended, whichever is later, and
//! lasts `link.duration(call, bytes)`, like `LocalWorld`'s comm thread. The caller never waits on
//! that thread while issuing.
//!
//! Differences from `LocalWorld`, since a rank here sees only its own buffers: `all_to_all_v` is
//! charged with this rank's own off-rank traffic (the larger of rows sent and received), not the
//! busiest rank's; and the trace's `all_issued` is when the inner collective completed, which
//! includes the transport's own time.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use super::{
    CallShape, CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, LinkModel,
    Pending, Rows, semantics,
};
use crate::trace::{Span, Stream, Trace};

/// A job for the link thread: waits for the inner collective, returns when the link model makes
/// its data arrive (given when the link is free).
type LinkJob = Box<dyn FnOnce(Instant) -> Instant + Send>;

/// A communicator whose collectives take the time of a [`LinkModel`] on top of `C`'s transport.
pub struct LinkedComm<C> {
    inner: C,
    link: LinkModel,
    trace: Trace,
    queue: Mutex<(u64, Option<mpsc::Sender<LinkJob>>)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl<C> std::fmt::Debug for LinkedComm<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedComm")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl<C: Communicator> LinkedComm<C> {
    /// `inner` behind `link`; each collective is recorded into `trace` (stream `Comm`, from the
    /// modelled start of the transfer to its arrival). Give `inner` a disabled trace.
    pub fn new(inner: C, link: LinkModel, trace: Trace) -> Result<Self, CommError> {
        link.validate()?;
        let (tx, rx) = mpsc::channel::<LinkJob>();
        let thread = thread::Builder::new()
            .name(format!("farskip-link-{}", inner.rank()))
            .spawn(move || {
                let mut link_free = Instant::now();
                for job in rx {
                    let arrive = job(link_free);
                    // The next transfer starts after this one's, like LocalWorld's comm thread.
                    sleep_until(arrive);
                    link_free = arrive;
                }
            })
            .map_err(|e| CommError::Backend {
                backend: "link",
                op: "spawning the link thread".to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            inner,
            link,
            trace,
            queue: Mutex::new((0, Some(tx))),
            thread: Some(thread),
        })
    }

    /// The communicator that moves the data.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The trace the link records into.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    fn through_link<T: Send + 'static>(
        &self,
        call: CollectiveCall,
        pending: Pending<T>,
        bytes: impl FnOnce(&T) -> usize + Send + 'static,
    ) -> Pending<T> {
        let posted = Instant::now();
        let timeout = pending.timeout();
        let (reply, answer) = mpsc::sync_channel::<Result<(T, Instant), CommError>>(1);
        let link = self.link.clone();
        let trace = self.trace.clone();
        let rank = self.inner.rank();
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = queue.0;
        queue.0 += 1;
        let op = semantics::describe(&call, seq, rank);
        let job: LinkJob = Box::new(move |link_free| {
            let result = pending.wait();
            let done = Instant::now();
            match result {
                Ok(value) => {
                    let start = done.max(link_free);
                    let arrive = start + link.duration(&call, bytes(&value));
                    if trace.is_enabled() {
                        trace.record(Span {
                            rank,
                            stream: Stream::Comm,
                            layer: call.tag.layer,
                            op: call.tag.name.clone(),
                            phase: call.tag.phase,
                            start: trace.offset_of(start),
                            end: trace.offset_of(arrive),
                            issued: Some(trace.offset_of(posted)),
                            all_issued: Some(trace.offset_of(done)),
                        });
                    }
                    let _ = reply.send(Ok((value, arrive)));
                    arrive
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    done
                }
            }
        });
        let sent = queue.1.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        drop(queue);
        if !sent {
            let err = CommError::Backend {
                backend: "link",
                op: op.clone(),
                detail: format!("the link thread of rank {rank} has stopped"),
            };
            return Pending::ready(op, Err(err));
        }
        // The inner wait has its own timeout; this one also covers the modelled link time.
        Pending::from_waiter(op.clone(), timeout, move |timeout| {
            let started = Instant::now();
            match answer.recv_timeout(timeout) {
                Ok(result) => result.and_then(|(value, arrive)| {
                    let give_up = started + timeout;
                    if arrive > give_up {
                        sleep_until(give_up);
                        return Err(CommError::Timeout {
                            op,
                            waited: started.elapsed(),
                            missing: Vec::new(),
                        });
                    }
                    sleep_until(arrive);
                    Ok(value)
                }),
                Err(RecvTimeoutError::Timeout) => Err(CommError::Timeout {
                    op,
                    waited: started.elapsed(),
                    missing: Vec::new(),
                }),
                Err(RecvTimeoutError::Disconnected) => Err(CommError::Backend {
                    backend: "link",
                    op,
                    detail: format!("the link thread of rank {rank} has stopped"),
                }),
            }
        })
    }

    fn flat(
        &self,
        kind: CollectiveKind,
        tag: CollectiveTag,
        len: usize,
        pending: Pending<Vec<f32>>,
    ) -> Pending<Vec<f32>> {
        let n = self.inner.world_size();
        let call = CollectiveCall {
            kind,
            tag,
            shape: CallShape::Elements { len },
        };
        let bytes = flat_wire_bytes(kind, len, n);
        self.through_link(call, pending, move |_| bytes)
    }
}

/// The busiest link's bytes of a flat collective, as [`LinkModel::duration`] documents them.
fn flat_wire_bytes(kind: CollectiveKind, len: usize, n: usize) -> usize {
    let b = len * std::mem::size_of::<f32>();
    if n <= 1 {
        return 0;
    }
    match kind {
        CollectiveKind::AllReduce => 2 * (n - 1) * b / n,
        CollectiveKind::AllGather => (n - 1) * b,
        CollectiveKind::ReduceScatter => (n - 1) * b / n,
        CollectiveKind::Broadcast => b,
        CollectiveKind::AllToAllV | CollectiveKind::Barrier => 0,
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

impl<C> Drop for LinkedComm<C> {
    fn drop(&mut self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.1 = None;
        drop(queue);
        if let Some(thread) = self.thread.take()
            && !thread::panicking()
        {
            // Queued jobs end within their inner timeouts plus their link time.
            let _ = thread.join();
        }
    }
}

impl<C: Communicator> Communicator for LinkedComm<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let len = data.len();
        let pending = self.inner.all_reduce(tag.clone(), data);
        self.flat(CollectiveKind::AllReduce, tag, len, pending)
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        let me = self.inner.rank();
        let n = self.inner.world_size();
        let sent: usize = (0..n).filter(|&p| p != me).map(|p| send.peer_rows(p)).sum();
        let row_len = send.row_len;
        let call = CollectiveCall {
            kind: CollectiveKind::AllToAllV,
            tag: tag.clone(),
            shape: CallShape::Rows { row_len },
        };
        let pending = self.inner.all_to_all_v(tag, send);
        self.through_link(call, pending, move |got: &Rows| {
            if n <= 1 {
                return 0;
            }
            let received: usize = (0..n).filter(|&p| p != me).map(|p| got.peer_rows(p)).sum();
            sent.max(received) * row_len * std::mem::size_of::<f32>()
        })
    }

    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let len = data.len();
        let pending = self.inner.all_gather(tag.clone(), data);
        self.flat(CollectiveKind::AllGather, tag, len, pending)
    }

    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        let len = data.len();
        let pending = self.inner.reduce_scatter(tag.clone(), data);
        self.flat(CollectiveKind::ReduceScatter, tag, len, pending)
    }

    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        let len = data.len();
        let pending = self.inner.broadcast(tag.clone(), root, data);
        let call = CollectiveCall {
            kind: CollectiveKind::Broadcast,
            tag,
            shape: CallShape::Broadcast { root, len },
        };
        let bytes = flat_wire_bytes(CollectiveKind::Broadcast, len, self.inner.world_size());
        self.through_link(call, pending, move |_| bytes)
    }

    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        let pending = self.inner.barrier(tag.clone());
        let call = CollectiveCall {
            kind: CollectiveKind::Barrier,
            tag,
            shape: CallShape::Empty,
        };
        self.through_link(call, pending, |_| 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::pending::DEFAULT_TIMEOUT;
    use super::*;
    use crate::comm::LocalWorld;

    /// Over an instant LocalWorld, a 30 ms link makes a wait last about 30 ms, results are unchanged,
    /// and issuing returns at once.
    #[test]
    fn link_time_is_added_after_the_transport_and_issue_does_not_block() {
        let results = LocalWorld::run(2, LinkModel::instant(), |comm| {
            let trace = Trace::new();
            let linked = LinkedComm::new(
                comm,
                LinkModel::new(Duration::from_millis(30), f64::INFINITY),
                trace.clone(),
            )?;
            let t0 = Instant::now();
            let p = linked.all_reduce(CollectiveTag::new("sum"), vec![comm.rank() as f32 + 0.5; 3]);
            let issue = t0.elapsed();
            let sum = p.wait()?;
            let waited = t0.elapsed();
            let spans = trace.spans();
            Ok::<_, CommError>((issue, waited, sum, spans.len()))
        })
        .expect("world starts");
        for r in results {
            let (issue, waited, sum, spans) = r.expect("rank ok");
            assert!(issue < Duration::from_millis(10), "issue took {issue:?}");
            assert!(waited >= Duration::from_millis(30), "waited {waited:?}");
            assert!(waited < Duration::from_millis(1000), "waited {waited:?}");
            assert_eq!(sum, vec![2.0; 3]);
            assert_eq!(spans, 1);
        }
    }

    #[test]
    fn default_timeout_is_the_inner_one() {
        let comm = crate::comm::SingleRank::new();
        let linked = LinkedComm::new(comm, LinkModel::instant(), Trace::disabled())
            .expect("link thread starts");
        let p = linked.barrier(CollectiveTag::new("b"));
        assert!(p.timeout() <= DEFAULT_TIMEOUT);
        p.wait().expect("barrier of one");
    }
}
