//! Lanes: independent tensor work side by side on the CPU, one single-threaded rayon pool per lane.
//!
//! flex splits each matmul over the whole rayon pool. For the shapes of an MoE layer that split gains little
//! on a few cores: on the 2-core build machine an expert's `[64, 512] × [512, 1024]` matmul ran as fast
//! single-threaded as split over both cores, and a layer's 16 expert matmul pairs took 24.7 ms either way,
//! but 12.7 ms when the rows were cut in two and each half ran single-threaded on its own core. Lanes do
//! the latter: [`map`] runs one closure per lane at once, each inside a one-thread pool, so every flex op in
//! it runs single-threaded and the lanes never wait for each other.
//!
//! **Lanes are off unless a program turns them on** ([`set_enabled`], or `FARSKIP_LANES=1` in the
//! environment), and meant for processes that only run inference: in a process that also trains with burn
//! 0.22's autodiff, inference forwards on lanes (evaluations, a frozen teacher) were followed, after some
//! hundred training steps, by `backward()` panicking with "graph tape has already been consumed" (3 of 5
//! recipe runs; none with lanes off). We have not found the cause; until we do, training never uses them.
//! One way lanes could extend an autodiff graph is closed: a plain input through autodiff weights gives autodiff
//! results, and the attention projections and the expert loop used to judge their work by the input alone (now
//! by the weights too; test `a_plain_input_through_autodiff_weights_stays_off_lanes`). Whether that was the
//! cause is not known: on the current code (hand-written backward ops for attention and the experts) the panic
//! did not come back in five recipe runs with `FARSKIP_LANES=1` (four `--quick`, one full) before that fix
//! either.
//!
//! When on, lanes are used only where they are safe and useful, otherwise the work runs in place, in order:
//! - the device is flex without autodiff;
//! - the caller is not already inside a rayon pool (a rank of a `LocalWorld` runs on its own pool, with its
//!   own share of the cores);
//! - no other thread holds the lanes (two callers never queue behind each other; the second runs in place).
//!
//! Results do not depend on whether lanes were used: each piece of work is the same ops on the same rows.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use burn::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// Whether [`set_enabled`] turned lanes on (initially: `FARSKIP_LANES` is `1` or `on`).
fn enabled() -> &'static AtomicBool {
    static ENABLED: OnceLock<AtomicBool> = OnceLock::new();
    ENABLED.get_or_init(|| {
        AtomicBool::new(std::env::var("FARSKIP_LANES").is_ok_and(|v| v == "1" || v == "on"))
    })
}

/// Turns lanes on or off for the whole process (see the module docs: on only in processes that do not train).
pub fn set_enabled(on: bool) {
    enabled().store(on, Ordering::Relaxed);
}

/// Whether lanes are on for this process.
pub fn is_enabled() -> bool {
    enabled().load(Ordering::Relaxed)
}

/// The lane pools (one thread each), built on first use; empty if they could not be built.
fn pools() -> &'static [ThreadPool] {
    static POOLS: OnceLock<Vec<ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        // Outside any pool, `current_num_threads` is the global pool's size (RAYON_NUM_THREADS or the cores).
        let n = rayon::current_num_threads();
        if n < 2 {
            return Vec::new();
        }
        (0..n)
            .map(|i| {
                ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("farskip-lane-{i}"))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_default()
    })
}

/// Held while lanes run, so two callers never share them.
static BUSY: Mutex<()> = Mutex::new(());

/// Calls of [`map`] that ran on lanes (for tests and diagnostics).
static RUNS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Calls that ran on lanes from this thread (tests that must not count other threads' work).
    static RUNS_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many times work has run on lanes in this process.
pub fn runs() -> usize {
    RUNS.load(Ordering::Relaxed)
}

/// How many times work this thread handed out has run on lanes.
pub fn runs_from_this_thread() -> usize {
    RUNS_HERE.with(std::cell::Cell::get)
}

/// The device to judge work by (the `device` argument of [`map`], [`ranges`], ...) when it reads an input on
/// `input` through weights on `weights`: the weights' when they are on an autodiff device, else the input's. A
/// plain input times autodiff weights gives autodiff results, and lanes never build an autodiff graph from several
/// threads at once.
pub fn work_device(input: Device, weights: Device) -> Device {
    if weights.is_autodiff() {
        weights
    } else {
        input
    }
}

/// The lanes, if work on `device` may use them now (see the module docs), with the guard that reserves them.
fn acquire(device: &Device) -> Option<(MutexGuard<'static, ()>, &'static [ThreadPool])> {
    // Device equality ignores autodiff, hence the explicit check.
    if !is_enabled()
        || device.is_autodiff()
        || *device != Device::flex()
        || rayon::current_thread_index().is_some()
    {
        return None;
    }
    let pools = pools();
    if pools.len() < 2 {
        return None;
    }
    let guard = match BUSY.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    Some((guard, pools))
}

/// How many lanes work on `device` would get now: 1 when it would run in place.
pub fn available(device: &Device) -> usize {
    acquire(device).map_or(1, |(_, pools)| pools.len())
}

/// `f` over `items`, the items spread over the lanes (item `i` on lane `i mod lanes`) and run at once;
/// results in item order. Runs in place, in order, when lanes are not available for `device`.
///
/// A panic in `f` is re-raised here after every lane has stopped.
pub fn map<T: Send, R: Send>(device: &Device, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    match acquire(device).filter(|_| items.len() > 1) {
        Some((_guard, pools)) => run_on(pools, items, f),
        None => items.into_iter().map(f).collect(),
    }
}

/// `f` over `0..n`, where item `i` costs about `i + 1` (query blocks that see ever more keys), spread over the
/// lanes in [`snake`] order so every lane gets equal work; results in index order. Runs in place, in order, when
/// lanes are not available for `device`.
pub fn map_increasing<R: Send>(device: &Device, n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    match acquire(device).filter(|_| n > 1) {
        Some((_guard, pools)) => {
            let order = snake(n, pools.len());
            let mut out: Vec<(usize, R)> = order
                .iter()
                .copied()
                .zip(run_on(pools, order.clone(), f))
                .collect();
            out.sort_by_key(|(i, _)| *i);
            out.into_iter().map(|(_, r)| r).collect()
        }
        None => (0..n).map(f).collect(),
    }
}

/// `f` over consecutive ranges of `0..n` of about equal length, one per lane and none shorter than `min_len`
/// (see [`split_rows`]), run at once; results in range order. One range, `0..n`, run in place, when lanes are
/// not available for `device` or `n < 2 * min_len`.
pub fn ranges<R: Send>(
    device: &Device,
    n: usize,
    min_len: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let lanes = acquire(device);
    let ranges = split_rows(n, lanes.as_ref().map_or(1, |(_, p)| p.len()), min_len);
    match lanes.filter(|_| ranges.len() > 1) {
        Some((_guard, pools)) => run_on(pools, ranges, f),
        None => ranges.into_iter().map(f).collect(),
    }
}

/// [`map`] on lanes already reserved.
fn run_on<T: Send, R: Send>(
    pools: &[ThreadPool],
    items: Vec<T>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    RUNS.fetch_add(1, Ordering::Relaxed);
    RUNS_HERE.with(|n| n.set(n.get() + 1));
    let n = pools.len().min(items.len());
    let mut buckets: Vec<Vec<(usize, T)>> = (0..n).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        buckets[i % n].push((i, item));
    }
    let f = &f;
    let run = |bucket: Vec<(usize, T)>| -> Vec<(usize, R)> {
        bucket.into_iter().map(|(i, t)| (i, f(t))).collect()
    };
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let mut lanes = buckets.into_iter().zip(pools);
        let (first, pool0) = lanes.next().expect("at least one bucket");
        let others: Vec<_> = lanes
            .map(|(bucket, pool)| s.spawn(move || pool.install(|| run(bucket))))
            .collect();
        let mut done = pool0.install(|| run(first));
        for h in others {
            done.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        done
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// An order of `n` items of increasing cost (item `i` costs about `i + 1`) for [`map`] on `lanes` lanes:
/// each round of `lanes` items alternates direction, so lane 0 gets the cheapest item of one round and the
/// dearest of the next (2 lanes, 4 items: `[0, 1, 3, 2]`, lane 0 runs items 0 and 3, lane 1 items 1 and 2).
pub fn snake(n: usize, lanes: usize) -> Vec<usize> {
    let l = lanes.max(1);
    (0..n)
        .map(|p| {
            let (round, j) = (p / l, p % l);
            let i = if round % 2 == 1 {
                round * l + (l - 1 - j)
            } else {
                p
            };
            // A short last round keeps its items in order.
            if i < n { i } else { p }
        })
        .collect()
}

/// Cuts `rows` rows into at most `lanes` consecutive ranges of about equal length, none shorter than
/// `min_rows` (one range when `rows < 2 * min_rows`).
pub fn split_rows(rows: usize, lanes: usize, min_rows: usize) -> Vec<std::ops::Range<usize>> {
    let n = lanes.min(rows / min_rows.max(1)).max(1);
    (0..n)
        .map(|i| (i * rows / n)..((i + 1) * rows / n))
        .collect()
}

/// Runs `f` on row ranges of `x` (`[rows, ...]` along dim 0) on the lanes and concatenates the results along
/// dim 0; `f` must act on each row independently. In place when lanes are not available or `x` has fewer
/// than `2 * min_rows` rows.
pub fn rows<const D: usize, const E: usize>(
    x: Tensor<D>,
    min_rows: usize,
    f: impl Fn(Tensor<D>) -> Tensor<E> + Sync,
) -> Tensor<E> {
    let n = x.dims()[0];
    let mut parts = ranges(&x.device(), n, min_rows, |r| {
        f(x.clone().narrow(0, r.start, r.len()))
    });
    match parts.len() {
        1 => parts.remove(0),
        _ => Tensor::cat(parts, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The tests that use lanes run one at a time, so none finds them taken by another.
    /// Also turns lanes on (the autodiff tests of this crate take one backward each, far from the hundreds of
    /// training steps after which the panic described in the module docs appeared).
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        set_enabled(true);
        guard
    }

    #[test]
    fn snake_is_a_permutation_that_evens_out_rising_costs() {
        assert_eq!(snake(4, 2), vec![0, 1, 3, 2]);
        assert_eq!(snake(3, 1), vec![0, 1, 2]);
        for n in 0..12 {
            for lanes in 1..5 {
                let order = snake(n, lanes);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..n).collect::<Vec<_>>(),
                    "n {n}, lanes {lanes}: {order:?}"
                );
            }
        }
    }

    #[test]
    fn split_rows_covers_every_row_once() {
        for rows in [0, 1, 7, 64, 127, 128, 1000] {
            for lanes in [1, 2, 3, 8] {
                let r = split_rows(rows, lanes, 32);
                assert_eq!(r.first().map(|r| r.start), Some(0));
                assert_eq!(r.last().map(|r| r.end), Some(rows));
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                assert!(r.len() <= lanes.max(1));
                if r.len() > 1 {
                    assert!(
                        r.iter().all(|r| r.len() >= 32),
                        "{rows} rows, {lanes} lanes: {r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn map_keeps_item_order_and_rows_match_in_place() {
        let _serial = serial();
        let device = Device::flex();
        let out = map(&device, (0..9).collect(), |i: usize| i * i);
        assert_eq!(out, (0..9).map(|i| i * i).collect::<Vec<_>>());
        for n in [0, 1, 2, 5, 9] {
            let out = map_increasing(&device, n, |i| i * i);
            assert_eq!(out, (0..n).map(|i| i * i).collect::<Vec<_>>());
        }

        let x = Tensor::<2>::random([300, 24], Distribution::Default, &device);
        let w = Tensor::<2>::random([24, 40], Distribution::Default, &device);
        let laned = rows(x.clone(), 16, |x| x.matmul(w.clone()).exp());
        let direct = x.matmul(w).exp();
        let diff: f32 = (laned - direct).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
    }

    /// The whole model (expert loop, projections, output projection on lanes) against the same forward inside
    /// a one-thread pool, where lanes are off.
    #[test]
    fn model_forward_on_lanes_matches_the_forward_without_them() -> crate::Result<()> {
        let _serial = serial();
        use crate::{Connectivity, Model, ModelConfig};
        let device = Device::flex();
        let config = ModelConfig::small_moe(64, 48, 2, 4, 2, 12, 4, 2, 40, Some(24));
        let model = Model::new(&config, &device)?.with_connectivity(Connectivity::farskip())?;
        let ids: Vec<i64> = (0..2 * 300).map(|i| (i * 37 % 64) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 300]), &device);
        // Another test's forward may hold the lanes for a moment: retry until this one ran on them.
        let (mut laned, mut used) = (None, false);
        for _ in 0..50 {
            let before = runs();
            laned = Some(model.forward(ids.clone())?);
            used = runs() > before;
            if used || pools().len() < 2 {
                break;
            }
        }
        assert!(used || pools().len() < 2, "the forward never ran on lanes");
        let laned = laned.expect("at least one forward");
        let pool = ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        let in_place = pool.install(|| {
            assert_eq!(available(&device), 1, "lanes must be off inside a pool");
            model.forward(ids)
        })?;
        let diff: f32 = (laned - in_place).abs().max().into_scalar();
        assert!(diff <= 1e-5, "lanes changed the logits by {diff}");
        Ok(())
    }

    #[test]
    fn lanes_are_off_when_disabled_under_autodiff_and_inside_a_pool() {
        let _serial = serial();
        set_enabled(false);
        assert_eq!(available(&Device::flex()), 1);
        set_enabled(true);
        assert_eq!(available(&Device::flex().autodiff()), 1);
        let pool = ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a two-thread pool");
        assert_eq!(pool.install(|| available(&Device::flex())), 1);
    }

    /// A plain input times autodiff weights gives autodiff results: the projections of such an input stay on
    /// the calling thread, and the gradient reaches the weights. (The input decided alone before: lanes would
    /// have extended the autodiff graph from two threads at once.)
    #[test]
    fn a_plain_input_through_autodiff_weights_stays_off_lanes() -> crate::Result<()> {
        let _serial = serial();
        use crate::attention::AttentionKind;
        use crate::{Model, ModelConfig};
        let autodiff = Device::flex().autodiff();
        let config = ModelConfig::small_moe(64, 48, 1, 4, 2, 12, 4, 2, 40, None);
        let model = Model::new(&config, &autodiff)?;
        let attention = &model.layers[0].attention;
        let x = Tensor::<3>::random([1, 300, 48], Distribution::Default, &Device::flex());
        assert!(!x.is_autodiff());
        let plain = Model::new(&config, &Device::flex())?;
        if available(&Device::flex()) > 1 {
            // The same call with plain weights does use the lanes, so the assertion below can fail.
            let before = runs_from_this_thread();
            let _ = plain.layers[0].attention.project(x.clone(), 0, None);
            assert!(
                runs_from_this_thread() > before,
                "plain projections did not use the lanes"
            );
        }
        let before = runs_from_this_thread();
        let qkv = attention.project(x, 0, None);
        assert_eq!(
            runs_from_this_thread(),
            before,
            "autodiff projections ran on lanes"
        );
        assert!(qkv.q.is_autodiff());
        let grads = qkv.q.sum().backward();
        let AttentionKind::Gqa(a) = &attention.kind else {
            panic!("small_moe builds GQA attention");
        };
        assert!(
            a.q_proj.weight.grad(&grads).is_some(),
            "no gradient for q_proj"
        );
        Ok(())
    }

    #[test]
    fn a_panic_in_a_lane_reaches_the_caller_and_frees_the_lanes() {
        let _serial = serial();
        let device = Device::flex();
        let caught = std::panic::catch_unwind(|| {
            map(&device, vec![0, 1, 2, 3], |i: i32| {
                assert!(i != 3, "lane failure");
                i
            })
        });
        assert!(caught.is_err());
        assert_eq!(map(&device, vec![1, 2], |i: i32| i + 1), vec![2, 3]);
    }
}
