//! `all_to_all_v` on NCCL, run by the issue thread: an exchange of headers (call signature, group
//! count) and of the group counts, which the issue thread waits for, then the rows as grouped
//! send/recv queued on the comm stream. The rank that issued it never waits here.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::Comm;

use super::{Finish, Shared, check_calls, cuda_err, decode, grouped, nccl_err};
use crate::comm::{CollectiveCall, CommError, Rows};

/// Header words per peer in `all_to_all_v`: the call signature and the number of groups.
const HEADER: usize = CollectiveCall::WORDS + 1;

impl Shared {
    /// Header and count exchange (the issue thread waits for it), then the grouped send/recv of the
    /// rows (queued).
    pub(super) fn all_to_all_v_enqueue(
        &self,
        comm: &Comm,
        call: &CollectiveCall,
        seq: u64,
        op: &str,
        send: Rows,
    ) -> Result<Finish<Rows>, CommError> {
        let row_len = send.row_len;
        let counts_in = self.exchange_counts(comm, call, seq, op, &send.counts)?;

        // 3. Rows, queued on the comm stream; the caller waits on the event.
        let rows_in: Vec<usize> = counts_in.iter().map(|g| g.iter().sum()).collect();
        let total_rows_in: usize = rows_in.iter().sum();
        let mut data_dev = self
            .stream
            .alloc_zeros::<f32>(send.data.len().max(1))
            .map_err(cuda_err(op, "allocate rows"))?;
        if !send.data.is_empty() {
            self.stream
                .memcpy_htod(&send.data, &mut data_dev)
                .map_err(cuda_err(op, "copy rows"))?;
        }
        let mut recv_dev = self
            .stream
            .alloc_zeros::<f32>((total_rows_in * row_len).max(1))
            .map_err(cuda_err(op, "allocate received rows"))?;
        self.send_rows(
            comm,
            op,
            &send.peer_offsets(),
            &rows_in,
            row_len,
            &data_dev,
            &mut recv_dev,
        )?;
        Ok(Box::new(move |stream: &Arc<CudaStream>, op: &str| {
            let mut data = stream
                .clone_dtoh(&recv_dev)
                .map_err(cuda_err(op, "copy rows to host"))?;
            data.truncate(total_rows_in * row_len);
            drop(data_dev);
            Ok(Rows {
                row_len,
                data,
                counts: counts_in,
            })
        }))
    }

    /// Steps 1 and 2 of `all_to_all_v`: headers (call signature, group count per peer) and the
    /// group counts, both waited for by the issue thread. Returns the counts received per peer.
    pub(super) fn exchange_counts(
        &self,
        comm: &Comm,
        call: &CollectiveCall,
        seq: u64,
        op: &str,
        counts: &[Vec<usize>],
    ) -> Result<Vec<Vec<usize>>, CommError> {
        let (n, me) = (self.world, self.rank);
        let started = Instant::now();

        // 1. Headers: every peer learns our call and how many groups we send it.
        let words = call.to_words();
        let mut header = Vec::with_capacity(n * HEADER);
        for groups in counts {
            header.extend_from_slice(&words);
            header.push(groups.len() as u64);
        }
        let header_dev = self
            .stream
            .clone_htod(&header)
            .map_err(cuda_err(op, "copy headers"))?;
        let mut header_in = self
            .stream
            .alloc_zeros::<u64>(n * HEADER)
            .map_err(cuda_err(op, "allocate headers"))?;
        grouped(op, || {
            for p in 0..n {
                let peer = Self::peer(p, op)?;
                comm.send(&header_dev.slice(p * HEADER..(p + 1) * HEADER), peer)
                    .map_err(nccl_err(op, "send header"))?;
                comm.recv(&mut header_in.slice_mut(p * HEADER..(p + 1) * HEADER), peer)
                    .map_err(nccl_err(op, "recv header"))?;
            }
            Ok(())
        })?;
        let headers = self.sync_read(&header_in, op, started)?;
        let calls: Vec<CollectiveCall> = (0..n)
            .map(|s| {
                decode(
                    &headers[s * HEADER..s * HEADER + CollectiveCall::WORDS],
                    s,
                    op,
                )
            })
            .collect::<Result<_, _>>()?;
        check_calls(&calls, me, seq)?;
        let groups_in: Vec<usize> = (0..n)
            .map(|s| headers[s * HEADER + CollectiveCall::WORDS] as usize)
            .collect();

        // 2. Group counts.
        let counts_out: Vec<u64> = counts.iter().flatten().map(|c| *c as u64).collect();
        let counts_dev = self
            .stream
            .clone_htod(&counts_out_or_one(&counts_out))
            .map_err(cuda_err(op, "copy counts"))?;
        let total_in: usize = groups_in.iter().sum();
        let mut counts_in_dev = self
            .stream
            .alloc_zeros::<u64>(total_in.max(1))
            .map_err(cuda_err(op, "allocate counts"))?;
        grouped(op, || {
            let (mut at_out, mut at_in) = (0, 0);
            for (p, &k_in) in groups_in.iter().enumerate() {
                let peer = Self::peer(p, op)?;
                let k_out = counts[p].len();
                if k_out > 0 {
                    comm.send(&counts_dev.slice(at_out..at_out + k_out), peer)
                        .map_err(nccl_err(op, "send counts"))?;
                }
                at_out += k_out;
                if k_in > 0 {
                    comm.recv(&mut counts_in_dev.slice_mut(at_in..at_in + k_in), peer)
                        .map_err(nccl_err(op, "recv counts"))?;
                }
                at_in += k_in;
            }
            Ok(())
        })?;
        let flat_in = self.sync_read(&counts_in_dev, op, started)?;
        let mut counts_in = Vec::with_capacity(n);
        let mut at = 0;
        for &g in &groups_in {
            counts_in.push(
                flat_in[at..at + g]
                    .iter()
                    .map(|c| *c as usize)
                    .collect::<Vec<_>>(),
            );
            at += g;
        }

        Ok(counts_in)
    }

    /// Step 3 of `all_to_all_v`: the rows as grouped send/recv, queued on the comm stream.
    /// `out_offsets` are the first row sent to each peer (plus the end), `rows_in` the rows
    /// received from each peer, stored in rank order in `recv`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_rows(
        &self,
        comm: &Comm,
        op: &str,
        out_offsets: &[usize],
        rows_in: &[usize],
        row_len: usize,
        send: &CudaSlice<f32>,
        recv: &mut CudaSlice<f32>,
    ) -> Result<(), CommError> {
        grouped(op, || {
            let mut at_in = 0;
            for p in 0..self.world {
                let peer = Self::peer(p, op)?;
                let (a, b) = (out_offsets[p] * row_len, out_offsets[p + 1] * row_len);
                if b > a {
                    comm.send(&send.slice(a..b), peer)
                        .map_err(nccl_err(op, "send rows"))?;
                }
                let len = rows_in[p] * row_len;
                if len > 0 {
                    comm.recv(&mut recv.slice_mut(at_in..at_in + len), peer)
                        .map_err(nccl_err(op, "recv rows"))?;
                }
                at_in += len;
            }
            Ok(())
        })
    }
}

/// CUDA refuses zero-byte copies into fresh buffers: send one dummy word when there are none.
fn counts_out_or_one(counts: &[u64]) -> Vec<u64> {
    if counts.is_empty() {
        vec![0]
    } else {
        counts.to_vec()
    }
}
