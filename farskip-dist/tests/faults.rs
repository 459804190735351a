//! Faults in a LocalWorld: a rank that panics, returns an error, never calls, or leaves; and
//! mismatched collectives. Every other rank must get a clear error, well within the timeout.

use std::time::{Duration, Instant};

use farskip_dist::{
    CollectiveKind, CollectiveTag, CommError, Communicator, LinkModel, LocalWorld,
    LocalWorldConfig, RankError,
};

const TIMEOUT: Duration = Duration::from_secs(20);
/// "Quickly": far below the timeout, generous for a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(5);

fn config(timeout: Duration) -> LocalWorldConfig {
    LocalWorldConfig::new(LinkModel::instant()).with_timeout(timeout)
}

fn tag(name: &'static str) -> CollectiveTag {
    CollectiveTag::new(name).at_layer(2)
}

/// The error of a rank that returned `Err(CommError)`.
fn comm_err<T: std::fmt::Debug>(r: &Result<T, RankError<CommError>>) -> &CommError {
    match r {
        Err(RankError::Failed(e)) => e,
        other => panic!("expected a collective error, got {other:?}"),
    }
}

#[test]
fn a_panicking_rank_fails_its_peers_quickly() -> Result<(), CommError> {
    let started = Instant::now();
    let out = LocalWorld::run_with(3, config(TIMEOUT), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(50));
            panic!("expert kernel exploded");
        }
        c.all_reduce(tag("ar"), vec![1.0; 4]).wait()
    })?;
    assert!(started.elapsed() < QUICK, "took {:?}", started.elapsed());
    assert!(matches!(&out[1], Err(RankError::Panicked(m)) if m.contains("expert kernel exploded")));
    for r in [0, 2] {
        match comm_err(&out[r]) {
            CommError::PeerFailed { rank, reason, op } => {
                assert_eq!(*rank, 1);
                assert!(
                    reason.contains("panicked: expert kernel exploded"),
                    "{reason}"
                );
                assert!(
                    op.contains("all_reduce") && op.contains(&format!("rank {r}")),
                    "{op}"
                );
            }
            other => panic!("rank {r}: expected PeerFailed, got {other}"),
        }
    }
    Ok(())
}

#[test]
fn a_rank_returning_an_error_fails_its_peers() -> Result<(), CommError> {
    let started = Instant::now();
    let out = LocalWorld::run_with(2, config(TIMEOUT), |c| {
        if c.rank() == 0 {
            return Err(CommError::InvalidArgument("bad batch on rank 0".to_owned()));
        }
        // Rank 1 first completes nothing, then waits on a collective rank 0 never joins.
        c.barrier(tag("b")).wait()
    })?;
    assert!(started.elapsed() < QUICK);
    match comm_err(&out[1]) {
        CommError::PeerFailed {
            rank: 0, reason, ..
        } => {
            assert!(reason.contains("bad batch on rank 0"), "{reason}");
        }
        other => panic!("expected PeerFailed from rank 0, got {other}"),
    }
    Ok(())
}

#[test]
fn a_rank_that_never_calls_times_out_its_peers() -> Result<(), CommError> {
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let out = LocalWorld::run_with(2, config(timeout), |c| {
        if c.rank() == 1 {
            // Alive but busy elsewhere for longer than the timeout, then done.
            std::thread::sleep(Duration::from_millis(1200));
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let r = c.all_gather(tag("ag"), vec![0.0; 3]).wait();
        // The rank got its answer near the timeout, not when rank 1 finished.
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t0.elapsed()
        );
        r
    })?;
    assert!(started.elapsed() < QUICK);
    match comm_err(&out[0]) {
        CommError::Timeout {
            op,
            waited,
            missing,
        } => {
            assert!(*waited >= timeout);
            assert_eq!(missing, &vec![1]);
            assert!(op.contains("all_gather"), "{op}");
        }
        other => panic!("expected Timeout, got {other}"),
    }
    assert!(out[1].is_ok());
    Ok(())
}

#[test]
fn a_rank_that_leaves_early_is_reported_at_once() -> Result<(), CommError> {
    let started = Instant::now();
    let out = LocalWorld::run_with(3, config(TIMEOUT), |c| {
        let first = c.all_reduce(tag("first"), vec![1.0]).wait()?;
        if c.rank() == 2 {
            return Ok(first); // leaves after one collective
        }
        c.all_reduce(tag("second"), vec![1.0]).wait()
    })?;
    assert!(started.elapsed() < QUICK);
    for r in [0, 1] {
        match comm_err(&out[r]) {
            CommError::PeerExited {
                rank: 2,
                issued: 1,
                op,
            } => assert!(op.contains("second")),
            other => panic!("rank {r}: expected PeerExited from rank 2, got {other}"),
        }
    }
    Ok(())
}

#[test]
fn different_collective_kinds_are_a_mismatch_naming_both_calls() -> Result<(), CommError> {
    let started = Instant::now();
    let out = LocalWorld::run_with(2, config(TIMEOUT), |c| {
        if c.rank() == 0 {
            c.all_reduce(tag("x"), vec![1.0; 4]).wait()
        } else {
            c.all_gather(tag("x"), vec![1.0; 4]).wait()
        }
    })?;
    assert!(started.elapsed() < QUICK);
    for (me, other_rank) in [(0, 1), (1, 0)] {
        let err = comm_err(&out[me]);
        match err {
            CommError::Mismatch {
                seq,
                rank,
                call,
                peer,
                peer_call,
            } => {
                assert_eq!((*seq, *rank, *peer), (0, me, other_rank));
                let kinds = [CollectiveKind::AllReduce, CollectiveKind::AllGather];
                assert_eq!(call.kind, kinds[me]);
                assert_eq!(peer_call.kind, kinds[other_rank]);
            }
            other => panic!("expected Mismatch, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("all_reduce") && msg.contains("all_gather"),
            "{msg}"
        );
        assert!(msg.contains("rank 0") && msg.contains("rank 1"), "{msg}");
    }
    Ok(())
}

#[test]
fn different_lengths_are_a_mismatch() -> Result<(), CommError> {
    let out = LocalWorld::run_with(3, config(TIMEOUT), |c| {
        let len = if c.rank() == 2 { 5 } else { 4 };
        c.all_reduce(tag("grads"), vec![1.0; len]).wait()
    })?;
    for (r, o) in out.iter().enumerate() {
        let msg = comm_err(o).to_string();
        assert!(
            msg.contains("len 4") && msg.contains("len 5"),
            "rank {r}: {msg}"
        );
        assert!(msg.contains("rank 2"), "rank {r}: {msg}");
    }
    Ok(())
}

#[test]
fn different_tags_and_row_lengths_are_mismatches() -> Result<(), CommError> {
    let out = LocalWorld::run_with(2, config(TIMEOUT), |c| {
        let name = if c.rank() == 0 { "dispatch" } else { "combine" };
        let r = c.barrier(tag(name)).wait();
        let msg = match r {
            Err(CommError::Mismatch { .. }) => r.err().map(|e| e.to_string()),
            _ => None,
        };
        let rows = farskip_dist::Rows::per_peer(c.rank() + 1, vec![], vec![0, 0]);
        let r2 = c.all_to_all_v(CollectiveTag::new("a2a"), rows).wait();
        Ok::<_, CommError>((msg, r2.err().map(|e| e.to_string())))
    })?;
    for o in out {
        let (tag_msg, rows_msg) = o.map_err(|e| CommError::InvalidArgument(e.to_string()))?;
        let tag_msg = tag_msg.unwrap_or_default();
        assert!(
            tag_msg.contains("\"dispatch\"") && tag_msg.contains("\"combine\""),
            "{tag_msg}"
        );
        let rows_msg = rows_msg.unwrap_or_default();
        assert!(
            rows_msg.contains("row_len 1") && rows_msg.contains("row_len 2"),
            "{rows_msg}"
        );
    }
    Ok(())
}

#[test]
fn a_wait_timeout_shorter_than_the_link_fails_and_aborts_the_rank() -> Result<(), CommError> {
    let link = LinkModel::fixed_time_per_op(|_, _| Duration::from_millis(400));
    let out = LocalWorld::run_with(2, LocalWorldConfig::new(link).with_timeout(TIMEOUT), |c| {
        let first = c
            .all_reduce(tag("slow"), vec![1.0])
            .with_timeout(Duration::from_millis(50))
            .wait();
        let second = c.all_reduce(tag("after"), vec![1.0]).wait();
        Ok::<_, CommError>((first, second))
    })?;
    for o in out {
        let (first, second) = o.map_err(|e| CommError::InvalidArgument(e.to_string()))?;
        assert!(matches!(first, Err(CommError::Timeout { .. })), "{first:?}");
        // After giving up, this rank is aborted and its peer is failed: nothing runs on.
        assert!(
            matches!(
                second,
                Err(CommError::Aborted { .. } | CommError::PeerFailed { .. })
            ),
            "{second:?}"
        );
    }
    Ok(())
}

#[test]
fn argument_errors_do_not_panic() -> Result<(), CommError> {
    let out = LocalWorld::run_with(2, config(TIMEOUT), |c| {
        let scatter = c.reduce_scatter(tag("rs"), vec![1.0; 3]).wait();
        let bcast = c.broadcast(tag("bc"), 5, vec![1.0]).wait();
        Ok::<_, CommError>((scatter, bcast))
    })?;
    for o in out {
        let (scatter, bcast) = o.map_err(|e| CommError::InvalidArgument(e.to_string()))?;
        assert!(
            matches!(&scatter, Err(CommError::InvalidArgument(m)) if m.contains("not divisible by world size 2")),
            "{scatter:?}"
        );
        assert!(
            matches!(&bcast, Err(CommError::InvalidArgument(m)) if m.contains("root 5")),
            "{bcast:?}"
        );
    }
    Ok(())
}
