//! LocalWorld collectives: results against hand-computed references for world sizes 1..=4,
//! all_to_all_v with empty segments (property test), real overlap of comm and compute, link
//! calibration, and the comm spans it records.

use std::time::{Duration, Instant};

use farskip_dist::trace::{comm_time, hidden_comm_time, peer_wait_time};
use farskip_dist::{
    CollectiveTag, CommError, Communicator, LinkModel, LocalWorld, LocalWorldConfig, Phase,
    RankError, Rows, Trace, overlap_pct,
};
use proptest::prelude::*;

type Outcomes<T> = Vec<Result<T, RankError<CommError>>>;

fn all_ok<T>(outcomes: Outcomes<T>) -> Vec<T> {
    outcomes
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|e| panic!("rank {r} failed: {e}")))
        .collect()
}

fn tag(name: &'static str) -> CollectiveTag {
    CollectiveTag::new(name)
}

/// A value no two (rank, index) pairs share, with few mantissa bits so sums are exact.
fn val(rank: usize, i: usize) -> f32 {
    (rank * 100 + i) as f32 + 0.25
}

#[test]
fn all_reduce_sums_in_rank_order_bit_identically() -> Result<(), CommError> {
    for world in 1..=4 {
        // Values whose sum depends on the order: (1e8 − 1e8) + small ≠ (small − 1e8) + 1e8.
        let value = |r: usize, i: usize| match r {
            0 => 1e8f32,
            1 => -1e8,
            _ => r as f32 + i as f32 * 0.25,
        };
        let out = all_ok(LocalWorld::run(world, LinkModel::instant(), |c| {
            let data: Vec<f32> = (0..7).map(|i| value(c.rank(), i)).collect();
            c.all_reduce(tag("ar"), data).wait()
        })?);
        let mut expected: Vec<f32> = (0..7).map(|i| value(0, i)).collect();
        for r in 1..world {
            for (i, e) in expected.iter_mut().enumerate() {
                *e += value(r, i);
            }
        }
        for (r, got) in out.iter().enumerate() {
            let same = got
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "world {world} rank {r}: {got:?} != {expected:?}");
        }
    }
    Ok(())
}

#[test]
fn gather_scatter_broadcast_barrier() -> Result<(), CommError> {
    for world in 1..=4 {
        let out = all_ok(LocalWorld::run(world, LinkModel::instant(), |c| {
            let r = c.rank();
            let gathered = c.all_gather(tag("ag"), vec![val(r, 0), val(r, 1)]);
            let scattered =
                c.reduce_scatter(tag("rs"), (0..2 * world).map(|i| val(r, i)).collect());
            let root = world - 1;
            let data = if r == root {
                vec![7.5, -1.0]
            } else {
                vec![0.0; 2]
            };
            let bcast = c.broadcast(tag("bc"), root, data);
            let barrier = c.barrier(tag("barrier"));
            // Waited in another order than issued: completion order is the backend's business.
            barrier.wait()?;
            Ok((gathered.wait()?, scattered.wait()?, bcast.wait()?))
        })?);
        for (r, (gathered, scattered, bcast)) in out.into_iter().enumerate() {
            let expect_gather: Vec<f32> = (0..world).flat_map(|s| [val(s, 0), val(s, 1)]).collect();
            assert_eq!(gathered, expect_gather);
            let expect_scatter: Vec<f32> = (2 * r..2 * r + 2)
                .map(|i| (0..world).map(|s| val(s, i)).sum())
                .collect();
            assert_eq!(scattered, expect_scatter, "world {world} rank {r}");
            assert_eq!(bcast, vec![7.5, -1.0]);
        }
    }
    Ok(())
}

/// `counts[s][d]`: rows rank `s` sends to rank `d`; row values encode (s, d, i).
fn run_all_to_all(world: usize, row_len: usize, counts: &[Vec<usize>]) -> Result<(), String> {
    let cell = |s: usize, d: usize, i: usize, c: usize| (s * 1000 + d * 100 + i * 10 + c) as f32;
    let outcomes = LocalWorld::run(world, LinkModel::instant(), |comm| {
        let s = comm.rank();
        let mut data = Vec::new();
        for (d, &rows) in counts[s].iter().enumerate() {
            for i in 0..rows {
                data.extend((0..row_len).map(|c| cell(s, d, i, c)));
            }
        }
        let send = Rows::per_peer(row_len, data, counts[s].clone());
        comm.all_to_all_v(tag("a2a"), send).wait()
    })
    .map_err(|e| e.to_string())?;
    for (d, got) in outcomes.into_iter().enumerate() {
        let got = got.map_err(|e| format!("rank {d}: {e}"))?;
        let mut expected = Vec::new();
        for (s, row) in counts.iter().enumerate() {
            for i in 0..row[d] {
                expected.extend((0..row_len).map(|c| cell(s, d, i, c)));
            }
        }
        let expect_counts: Vec<Vec<usize>> = counts.iter().map(|row| vec![row[d]]).collect();
        if got.data != expected || got.counts != expect_counts || got.row_len != row_len {
            return Err(format!("rank {d} received {got:?}, expected {expected:?}"));
        }
    }
    Ok(())
}

#[test]
fn all_to_all_v_with_all_segments_empty() -> Result<(), String> {
    run_all_to_all(3, 4, &[vec![0, 0, 0], vec![0, 0, 0], vec![0, 0, 0]])?;
    run_all_to_all(2, 2, &[vec![0, 3], vec![0, 0]])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn all_to_all_v_delivers_every_segment(
        (world, row_len, counts) in (1usize..=4, 1usize..=3).prop_flat_map(|(w, h)| {
            // Zero is as likely as any other count, so empty segments are common.
            let counts = prop::collection::vec(prop::collection::vec(0usize..=3, w), w);
            (Just(w), Just(h), counts)
        })
    ) {
        run_all_to_all(world, row_len, &counts).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn a_rank_computes_while_its_collective_is_in_flight() -> Result<(), CommError> {
    let link = Duration::from_millis(300);
    let trace = Trace::new();
    let config = LocalWorldConfig::new(LinkModel::fixed_time_per_op(move |_, _| link))
        .with_trace(trace.clone());
    let started = Instant::now();
    let out = all_ok(LocalWorld::run_with(2, config, |c| {
        let pending = c.all_reduce(tag("overlapped").at_layer(0), vec![1.0; 16]);
        {
            let _compute = c.trace().compute(c.rank(), Some(0), "attn", Phase::Forward);
            std::thread::sleep(link);
        }
        pending.wait()
    })?);
    let wall = started.elapsed();
    assert_eq!(out[0], vec![2.0; 16]);
    // Serial would be ≥ 600 ms; overlapped ≈ 300 ms (generous margin for a loaded machine).
    assert!(
        wall < Duration::from_millis(520),
        "no overlap: took {wall:?}"
    );
    let spans = trace.spans();
    assert_eq!(spans.len(), 4, "{spans:?}");
    for r in 0..2 {
        assert!(comm_time(&trace, r, Phase::Forward) >= link);
        assert!(hidden_comm_time(&trace, r, Phase::Forward) > link / 2);
    }
    let pct = overlap_pct(&trace, Phase::Forward).unwrap_or(0.0);
    assert!(pct > 60.0, "overlap only {pct:.1}%");
    Ok(())
}

/// Rank 0 issues an all_to_all_v, computes for 400 ms and only then waits; rank 1 issues 200 ms late.
/// Issuing returns at once and the exchange completes while rank 0 computes (the same check runs on
/// MPI in tests/mpi.rs).
#[test]
fn all_to_all_v_does_not_block_the_issuing_rank_while_its_peer_is_late() -> Result<(), CommError> {
    let out = all_ok(LocalWorld::run(2, LinkModel::instant(), |c| {
        c.barrier(tag("start")).wait()?;
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let t0 = Instant::now();
        let rows = Rows::per_peer(4, vec![c.rank() as f32; 4 * 3], vec![1, 2]);
        let pending = c.all_to_all_v(tag("late"), rows);
        let issue = t0.elapsed();
        if c.rank() == 0 {
            let mut x = 1.0f64;
            while t0.elapsed() < Duration::from_millis(400) {
                x = std::hint::black_box(x * 1.000_000_1 + 1e-9);
            }
        }
        let t1 = Instant::now();
        let got = pending.wait()?;
        Ok::<_, CommError>((issue, t1.elapsed(), got))
    })?);
    let (issue, wait, got) = &out[0];
    assert!(
        *issue < Duration::from_millis(20),
        "issuing blocked rank 0 for {issue:?}"
    );
    assert!(
        *wait < Duration::from_millis(100),
        "the wait after computing took {wait:?}"
    );
    assert_eq!(got.counts, vec![vec![1], vec![1]]);
    assert_eq!(got.data, vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    Ok(())
}

#[test]
fn a_late_rank_shows_as_its_peers_wait_and_exposed_time() -> Result<(), CommError> {
    // Both ranks compute 100 ms behind a 100 ms collective (comm_ratio 1), but rank 1 issues it 80 ms late:
    // rank 0 waits for it, and most of rank 0's transfer outlasts its compute.
    let (link, late) = (Duration::from_millis(100), Duration::from_millis(80));
    let trace = Trace::new();
    let config = LocalWorldConfig::new(LinkModel::fixed_time_per_op(move |_, _| link))
        .with_trace(trace.clone());
    all_ok(LocalWorld::run_with(2, config, |c| {
        if c.rank() == 1 {
            std::thread::sleep(late);
        }
        let pending = c.all_reduce(tag("skewed").at_layer(0), vec![1.0; 4]);
        {
            let _compute = c.trace().compute(c.rank(), Some(0), "attn", Phase::Forward);
            std::thread::sleep(link);
        }
        pending.wait()
    })?);
    let wait = |r| peer_wait_time(&trace, r, Phase::Forward);
    let exposed =
        |r| comm_time(&trace, r, Phase::Forward) - hidden_comm_time(&trace, r, Phase::Forward);
    // Rank 1 starts its sleep a moment before rank 0 issues, so rank 0 waits a little under `late`.
    assert!(wait(0) >= late / 2, "rank 0 waited {:?}", wait(0));
    assert!(wait(1) < wait(0) / 4, "rank 1 waited {:?}", wait(1));
    assert!(exposed(0) >= late / 4, "rank 0 exposed {:?}", exposed(0));
    assert!(
        exposed(0) > exposed(1),
        "{:?} vs {:?}",
        exposed(0),
        exposed(1)
    );
    for s in trace
        .spans()
        .iter()
        .filter(|s| s.stream == farskip_dist::Stream::Comm)
    {
        let (issued, last) = (
            s.issued.expect("issue time"),
            s.all_issued.expect("last issue"),
        );
        assert!(issued <= last && last <= s.start, "{s:?}");
    }
    Ok(())
}

#[test]
fn bandwidth_model_charges_bytes() -> Result<(), CommError> {
    // all_gather of 25_000 f32 on 2 ranks: (n-1)·B = 100 kB at 1 MB/s = 100 ms, + 20 ms latency.
    let link = LinkModel::new(Duration::from_millis(20), 1e6);
    let started = Instant::now();
    all_ok(LocalWorld::run(2, link, |c| {
        c.all_gather(tag("ag"), vec![0.0; 25_000]).wait()
    })?);
    let wall = started.elapsed();
    assert!(wall >= Duration::from_millis(120), "too fast: {wall:?}");
    assert!(wall < Duration::from_millis(600), "too slow: {wall:?}");
    Ok(())
}

#[test]
fn per_op_link_sees_kind_tag_and_bytes() -> Result<(), CommError> {
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let link = LinkModel::fixed_time_per_op(move |call, bytes| {
        if let Ok(mut v) = log.lock() {
            v.push((
                call.kind.name(),
                call.tag.name.to_string(),
                call.tag.layer,
                bytes,
            ));
        }
        Duration::ZERO
    });
    all_ok(LocalWorld::run(2, link, |c| {
        c.all_reduce(tag("grad").at_layer(4), vec![0.0; 10]).wait()
    })?);
    let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
    // Both ranks' comm threads ask; ring all-reduce moves 2(n−1)/n · 40 bytes = 40.
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| *s == ("all_reduce", "grad".to_owned(), Some(4), 40))
    );
    Ok(())
}

#[test]
fn separate_comms_work_from_user_threads() -> Result<(), CommError> {
    let comms = LocalWorld::new(3, LinkModel::instant())?;
    let results: Vec<Result<Vec<f32>, CommError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| s.spawn(move || c.all_reduce(tag("x"), vec![c.rank() as f32]).wait()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CommError::InvalidArgument("panic".into())))
            })
            .collect()
    });
    for r in results {
        assert_eq!(r?, vec![3.0]);
    }
    Ok(())
}

#[test]
fn zero_ranks_is_an_error() {
    assert!(matches!(
        LocalWorld::new(0, LinkModel::instant()),
        Err(CommError::InvalidArgument(_))
    ));
    assert!(LocalWorld::new(2, LinkModel::new(Duration::ZERO, 0.0)).is_err());
}
