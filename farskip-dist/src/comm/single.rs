//! [`SingleRank`]: the world of one, where every collective completes immediately.

use super::semantics::{self, Output, Payload};
use super::{
    CollectiveCall, CollectiveKind, CollectiveTag, CommError, Communicator, Pending, Rows,
};

/// A communicator for a single rank. Collectives are computed on the calling thread and return
/// an already completed [`Pending`]; argument checks are the same as for the other backends,
/// so code that runs here runs under [`super::LocalWorld`] too.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl SingleRank {
    /// The single-rank communicator.
    pub fn new() -> Self {
        Self
    }

    fn run(
        &self,
        call: Result<CollectiveCall, CommError>,
        kind: CollectiveKind,
        payload: &Payload,
    ) -> (String, Result<Output, CommError>) {
        match call {
            Ok(call) => {
                let op = semantics::describe(&call, 0, 0);
                let result = semantics::result_for(&call, &[payload], 0, &op);
                (op, result)
            }
            Err(e) => (format!("{kind} on rank 0"), Err(e)),
        }
    }

    fn flat(
        &self,
        call: Result<CollectiveCall, CommError>,
        kind: CollectiveKind,
        data: Vec<f32>,
    ) -> Pending<Vec<f32>> {
        let (op, result) = self.run(call, kind, &Payload::Flat(data));
        let result = result.and_then(|o| o.into_flat(&op));
        Pending::ready(op, result)
    }

    fn flat_kind(
        &self,
        kind: CollectiveKind,
        tag: CollectiveTag,
        data: Vec<f32>,
    ) -> Pending<Vec<f32>> {
        let call = semantics::prepare_flat(kind, tag, data.len(), 1);
        self.flat(call, kind, data)
    }
}

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat_kind(CollectiveKind::AllReduce, tag, data)
    }

    fn all_to_all_v(&self, tag: CollectiveTag, send: Rows) -> Pending<Rows> {
        let call = semantics::prepare_rows(tag, &send, 1);
        let (op, result) = self.run(call, CollectiveKind::AllToAllV, &Payload::Rows(send));
        let result = result.and_then(|o| o.into_rows(&op));
        Pending::ready(op, result)
    }

    fn all_gather(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat_kind(CollectiveKind::AllGather, tag, data)
    }

    fn reduce_scatter(&self, tag: CollectiveTag, data: Vec<f32>) -> Pending<Vec<f32>> {
        self.flat_kind(CollectiveKind::ReduceScatter, tag, data)
    }

    fn broadcast(&self, tag: CollectiveTag, root: usize, data: Vec<f32>) -> Pending<Vec<f32>> {
        let call = semantics::prepare_broadcast(tag, root, data.len(), 1);
        self.flat(call, CollectiveKind::Broadcast, data)
    }

    fn barrier(&self, tag: CollectiveTag) -> Pending<()> {
        let call = Ok(semantics::prepare_barrier(tag));
        let (op, result) = self.run(call, CollectiveKind::Barrier, &Payload::Empty);
        let result = result.and_then(|o| o.into_unit(&op));
        Pending::ready(op, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag() -> CollectiveTag {
        CollectiveTag::new("t")
    }

    #[test]
    fn collectives_are_identities_on_one_rank() -> Result<(), CommError> {
        let c = SingleRank::new();
        assert_eq!(c.all_reduce(tag(), vec![1.0, 2.5]).wait()?, vec![1.0, 2.5]);
        assert_eq!(c.all_gather(tag(), vec![3.0]).wait()?, vec![3.0]);
        assert_eq!(
            c.reduce_scatter(tag(), vec![4.0, 5.0]).wait()?,
            vec![4.0, 5.0]
        );
        assert_eq!(c.broadcast(tag(), 0, vec![6.0]).wait()?, vec![6.0]);
        c.barrier(tag()).wait()?;
        let rows = Rows {
            row_len: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
            counts: vec![vec![1, 0, 1]],
        };
        assert_eq!(c.all_to_all_v(tag(), rows.clone()).wait()?, rows);
        Ok(())
    }

    #[test]
    fn bad_arguments_are_errors_not_panics() {
        let c = SingleRank::new();
        let err = c.broadcast(tag(), 3, vec![1.0]).wait();
        assert!(matches!(err, Err(CommError::InvalidArgument(ref m)) if m.contains("root 3")));
        let rows = Rows::per_peer(2, vec![1.0; 3], vec![2]);
        let err = c.all_to_all_v(tag(), rows).wait();
        assert!(matches!(err, Err(CommError::InvalidArgument(ref m)) if m.contains("holds 3")));
        let rows = Rows::per_peer(1, vec![], vec![0, 0]);
        let err = c.all_to_all_v(tag(), rows).wait();
        assert!(matches!(err, Err(CommError::InvalidArgument(ref m)) if m.contains("world of 1")));
    }
}
