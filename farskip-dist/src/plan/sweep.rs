//! Sweeps over one planning choice at a time: the EP × TP split of a device count, the skip depth across
//! inter-node bandwidths, and how many of the first layers are converted.

use farskip_model::{Connectivity, FarSkip, ModelConfig};

use super::{Cluster, Layout, Mode, PlanError, Prediction, Workload, predict_roofline};

/// Every EP × TP factorisation of `nodes` full nodes (TP inside a node; training: TP 1 only), with its
/// prediction.
pub fn ep_tp(
    config: &ModelConfig,
    conn: &Connectivity,
    cluster: &Cluster,
    nodes: usize,
    workload: &Workload,
) -> Result<Vec<(Layout, Prediction)>, PlanError> {
    let devices = nodes * cluster.devices_per_node;
    let mut out = Vec::new();
    for tp in (1..=cluster.devices_per_node).filter(|tp| devices.is_multiple_of(*tp)) {
        if workload.mode == Mode::Train && tp > 1 {
            continue;
        }
        let layout = Layout::new(devices / tp, tp, nodes, cluster)?;
        let plan = predict_roofline(config, conn, cluster, layout, workload)?;
        out.push((layout, plan.prediction));
    }
    Ok(out)
}

/// Skip depths `1..=max_depth` at each inter-node bandwidth (bytes/s per device): `(bandwidth, depth,
/// prediction)`.
pub fn depth(
    config: &ModelConfig,
    cluster: &Cluster,
    layout: Layout,
    workload: &Workload,
    inter_bws: &[f64],
    max_depth: usize,
) -> Result<Vec<(f64, usize, Prediction)>, PlanError> {
    let mut out = Vec::new();
    for &bw in inter_bws {
        let c = cluster.clone().with_inter_bw(bw);
        for d in 1..=max_depth {
            let conn = Connectivity::FarSkip(FarSkip::all().with_depth(d));
            let plan = predict_roofline(config, &conn, &c, layout, workload)?;
            out.push((bw, d, plan.prediction));
        }
    }
    Ok(out)
}

/// The first `k` layers converted, `k = 0..=layers` (`0`: the standard model), at skip depth `depth`.
pub fn layers(
    config: &ModelConfig,
    cluster: &Cluster,
    layout: Layout,
    workload: &Workload,
    depth: usize,
) -> Result<Vec<(usize, Prediction)>, PlanError> {
    let n = config.layers.len();
    let mut out = Vec::new();
    for k in 0..=n {
        let conn = if k == 0 {
            Connectivity::Standard
        } else {
            Connectivity::FarSkip(FarSkip::range(0, k - 1).with_depth(depth))
        };
        let plan = predict_roofline(config, &conn, cluster, layout, workload)?;
        out.push((k, plan.prediction));
    }
    Ok(out)
}
