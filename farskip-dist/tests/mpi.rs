//! The MPI backend under `mpirun` (feature `mpi`; a test without libtest's harness).
//!
//! Run directly (`cargo test -p farskip-dist --features mpi --test mpi`), the binary launches itself
//! under `mpirun --allow-run-as-root --oversubscribe` once per scenario and checks how each run
//! ends; under `mpirun` it is one rank of the scenario named by its argument:
//! - `collectives`: every collective equals LocalWorld's result bit for bit (the same inputs run on
//!   an in-process LocalWorld of the same size), also behind a link model; `all_to_all_v` does not
//!   block the issuing rank while its peer issues late.
//! - `mismatch`: ranks that make different calls both get `CommError::Mismatch`, and the
//!   communicator keeps working afterwards.
//! - `kill`: rank 1 SIGKILLs itself mid-run; rank 0's wait must fail naming rank 1 (with
//!   `mpirun --enable-recovery`), or `mpirun` ends the job naming rank 1 (its default). Never a hang.
//!
//! `FARSKIP_MPI_NP` sets the world sizes of the collectives scenario (default `2`; CI runs `2 4`).

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use farskip_dist::{
    CollectiveTag, CommError, Communicator, LinkModel, LinkedComm, LocalWorld, MpiConfig, MpiWorld,
    Rows, Trace, launched_by_mpirun,
};

fn main() -> ExitCode {
    if launched_by_mpirun() {
        let scenario = std::env::args().nth(1).unwrap_or_default();
        return rank_main(&scenario);
    }
    // libtest's flags (e.g. --list from tooling) mean nothing here.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    launcher()
}

// ---------------------------------------------------------------------------------------------
// Launcher: runs the scenarios under mpirun and judges their ends.

struct Outcome {
    code: Option<i32>,
    output: String,
    took: Duration,
}

fn mpirun(np: usize, extra: &[&str], scenario: &str, limit: Duration) -> Outcome {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .args(extra)
    .arg(&exe)
    .arg(scenario)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .expect("mpirun starts (install openmpi-bin and libopenmpi-dev)");
    // Read the pipes on threads so a chatty run cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait().expect("mpirun status") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`mpirun -np {np} {scenario}` did not end within {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let output = format!(
        "{}{}",
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default()
    );
    Outcome { code, output, took }
}

fn launcher() -> ExitCode {
    let sizes: Vec<usize> = std::env::var("FARSKIP_MPI_NP")
        .unwrap_or_else(|_| "2".to_owned())
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let mut failed = 0;
    let mut check = |name: &str, ok: bool, detail: &str| {
        if ok {
            println!("test mpi::{name} ... ok");
        } else {
            println!("test mpi::{name} ... FAILED\n{detail}");
            failed += 1;
        }
    };
    for np in sizes {
        let o = mpirun(np, &[], "collectives", Duration::from_secs(120));
        check(&format!("collectives_np{np}"), o.code == Some(0), &o.output);
    }
    let o = mpirun(2, &[], "mismatch", Duration::from_secs(60));
    check(
        "mismatched_calls_are_reported",
        o.code == Some(0),
        &o.output,
    );

    // Open MPI's default: mpirun ends the whole job when a rank dies and names it.
    let o = mpirun(2, &[], "kill", Duration::from_secs(60));
    check(
        "killed_rank_ends_the_job",
        o.code.is_some_and(|c| c != 0)
            && o.output.contains("rank 1")
            && o.took < Duration::from_secs(KILL_TIMEOUT_S + 10),
        &format!("exit {:?} after {:?}\n{}", o.code, o.took, o.output),
    );
    // With recovery enabled the survivor sees the loss itself (its process exits with status 3 after
    // printing the error that names rank 1; mpirun --enable-recovery itself exits 0).
    let o = mpirun(2, &["--enable-recovery"], "kill", Duration::from_secs(60));
    check(
        "killed_rank_is_named_by_the_survivor",
        o.output.contains("rank 0: lost rank 1")
            && o.took < Duration::from_secs(KILL_TIMEOUT_S + 10),
        &format!("exit {:?} after {:?}\n{}", o.code, o.took, o.output),
    );
    if failed == 0 {
        println!("test result: ok");
        ExitCode::SUCCESS
    } else {
        println!("test result: FAILED ({failed} failed)");
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// Ranks.

const KILL_TIMEOUT_S: u64 = 20;

fn rank_main(scenario: &str) -> ExitCode {
    let world = match MpiWorld::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("MPI init failed: {e}");
            return ExitCode::from(2);
        }
    };
    let rank = world.rank();
    let result = match scenario {
        "collectives" => collectives(&world),
        "mismatch" => mismatch(&world),
        "kill" => kill(&world),
        other => Err(format!("unknown scenario `{other}`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rank {rank}: {e}");
            drop(world);
            ExitCode::from(3)
        }
    }
}

/// Rank `r`'s inputs: values of mixed magnitude so that the order of a sum shows in its bits.
fn values(r: usize, len: usize, salt: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x =
                ((i as u32).wrapping_mul(2_654_435_761) ^ (r as u32).wrapping_mul(40_503) ^ salt)
                    % 10_007;
            (x as f32 / 10_007.0 - 0.5) * 10f32.powi((i % 7) as i32 - 3)
        })
        .collect()
}

/// Rank `r`'s all_to_all_v send buffer: `groups` groups per peer with uneven (sometimes zero) rows.
fn rows_for(r: usize, n: usize, row_len: usize) -> Rows {
    let counts: Vec<Vec<usize>> = (0..n)
        .map(|p| (0..3).map(|g| (r * 3 + p * 5 + g) % 4).collect())
        .collect();
    let total: usize = counts.iter().flatten().sum();
    Rows {
        row_len,
        data: values(r, total * row_len, 77),
        counts,
    }
}

/// The collectives of the check, in order, on any communicator.
fn run_all(comm: &dyn Communicator) -> Result<Vec<Vec<f32>>, CommError> {
    let (r, n) = (comm.rank(), comm.world_size());
    let t = |s: &'static str| CollectiveTag::new(s);
    // Issue several before waiting: they complete in issue order.
    let ar = comm.all_reduce(t("ar"), values(r, 37, 1));
    let rs = comm.reduce_scatter(t("rs"), values(r, 8 * n, 2));
    let ag = comm.all_gather(t("ag"), values(r, 5, 3));
    let bc = comm.broadcast(t("bc"), n - 1, values(r, 6, 4));
    let a2a = comm.all_to_all_v(t("a2a"), rows_for(r, n, 3));
    let empty = comm.all_reduce(t("empty"), Vec::new());
    let bar = comm.barrier(t("bar"));
    let a2a = a2a.wait()?;
    let mut counts: Vec<f32> = a2a.counts.iter().flatten().map(|c| *c as f32).collect();
    counts.extend(a2a.counts.iter().map(|g| g.len() as f32));
    let out = vec![
        ar.wait()?,
        rs.wait()?,
        ag.wait()?,
        bc.wait()?,
        a2a.data,
        counts,
        empty.wait()?,
    ];
    bar.wait()?;
    Ok(out)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|f| f.to_bits()).collect())
        .collect()
}

fn collectives(world: &MpiWorld) -> Result<(), String> {
    let (rank, n) = (world.rank(), world.size());
    let comm = world
        .communicator(MpiConfig::default().with_timeout(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let reference = LocalWorld::run(n, LinkModel::instant(), |c| run_all(c))
        .map_err(|e| e.to_string())?
        .swap_remove(rank)
        .map_err(|e| e.to_string())?;
    let got = run_all(&comm).map_err(|e| e.to_string())?;
    if bits(&got) != bits(&reference) {
        return Err(format!(
            "MPI results differ from LocalWorld's:\nmpi   {got:?}\nlocal {reference:?}"
        ));
    }

    // Behind a link model the results are the same and each wait takes the link's time.
    let trace = Trace::new();
    let linked = LinkedComm::new(
        &comm,
        LinkModel::new(Duration::from_millis(25), f64::INFINITY),
        trace.clone(),
    )
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let got = run_all(&linked).map_err(|e| e.to_string())?;
    let took = t0.elapsed();
    if bits(&got) != bits(&reference) {
        return Err("results behind the link model differ from LocalWorld's".to_owned());
    }
    // Seven collectives share the link one after another: at least 7 × 25 ms.
    if took < Duration::from_millis(175) {
        return Err(format!("seven 25 ms collectives took only {took:?}"));
    }
    let spans = trace.spans();
    if spans.len() != 7
        || spans
            .iter()
            .any(|s| s.duration() < Duration::from_millis(24))
    {
        return Err(format!("expected 7 comm spans of ≥ 25 ms, got {spans:?}"));
    }
    drop(linked);

    non_blocking(&comm)?;
    comm.barrier(CollectiveTag::new("done"))
        .wait()
        .map_err(|e| e.to_string())
}

/// Rank 0 issues an all_to_all_v, computes for 400 ms and only then waits; rank 1 issues 200 ms
/// late. Issuing must return at once, and the data must be there when rank 0 finishes computing.
fn non_blocking(comm: &dyn Communicator) -> Result<(), String> {
    let (r, n) = (comm.rank(), comm.world_size());
    comm.barrier(CollectiveTag::new("nb_start"))
        .wait()
        .map_err(|e| e.to_string())?;
    if r != 0 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let t0 = Instant::now();
    let pending = comm.all_to_all_v(CollectiveTag::new("late"), rows_for(r, n, 64));
    let issue = t0.elapsed();
    if r == 0 {
        // Compute: a busy loop the optimiser cannot remove.
        let mut x = 1.0f64;
        while t0.elapsed() < Duration::from_millis(400) {
            x = std::hint::black_box(x * 1.000_000_1 + 1e-9);
        }
        let t1 = Instant::now();
        pending.wait().map_err(|e| e.to_string())?;
        let wait = t1.elapsed();
        if issue > Duration::from_millis(20) {
            return Err(format!("issuing all_to_all_v blocked rank 0 for {issue:?}"));
        }
        if wait > Duration::from_millis(100) {
            return Err(format!(
                "the exchange did not progress while rank 0 computed: the wait took {wait:?}"
            ));
        }
    } else {
        pending.wait().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn mismatch(world: &MpiWorld) -> Result<(), String> {
    let rank = world.rank();
    let comm = world
        .communicator(MpiConfig::default().with_timeout(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let expect_mismatch = |result: Result<Vec<f32>, CommError>, what: &str| match result {
        Err(CommError::Mismatch { rank: me, peer, .. }) if me == rank && peer != rank => Ok(()),
        other => Err(format!("{what}: expected a mismatch, got {other:?}")),
    };
    // Another tag.
    let tag = if rank == 0 { "attn_out" } else { "combine" };
    expect_mismatch(
        comm.all_reduce(CollectiveTag::new(tag), vec![1.0; 4])
            .wait(),
        "different tags",
    )?;
    // Another kind (and payload shape).
    let r = if rank == 0 {
        comm.all_gather(CollectiveTag::new("x"), vec![1.0; 3])
            .wait()
    } else {
        comm.barrier(CollectiveTag::new("x"))
            .wait()
            .map(|()| Vec::new())
    };
    expect_mismatch(r, "different kinds")?;
    // Another length.
    let len = 4 + rank;
    expect_mismatch(
        comm.all_reduce(CollectiveTag::new("len"), vec![1.0; len])
            .wait(),
        "different lengths",
    )?;
    // The communicator still works.
    let sum = comm
        .all_reduce(CollectiveTag::new("after"), vec![1.0; 2])
        .wait()
        .map_err(|e| e.to_string())?;
    if sum != vec![world.size() as f32; 2] {
        return Err(format!("all_reduce after the mismatches gave {sum:?}"));
    }
    Ok(())
}

fn kill(world: &MpiWorld) -> Result<(), String> {
    let rank = world.rank();
    let comm = world
        .communicator(MpiConfig::default().with_timeout(Duration::from_secs(KILL_TIMEOUT_S)))
        .map_err(|e| e.to_string())?;
    comm.barrier(CollectiveTag::new("alive"))
        .wait()
        .map_err(|e| e.to_string())?;
    if rank == 1 {
        let _ = Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(60));
        return Err("rank 1 survived SIGKILL".to_owned());
    }
    std::thread::sleep(Duration::from_millis(300));
    match comm
        .all_reduce(CollectiveTag::new("after_kill"), vec![1.0; 4])
        .wait()
    {
        Err(CommError::PeerFailed { rank: lost, .. }) => Err(format!("lost rank {lost}")),
        Err(e) => Err(format!("expected the loss of rank 1, got: {e}")),
        Ok(v) => Err(format!("all_reduce with a dead peer returned {v:?}")),
    }
}
