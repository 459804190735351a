//! Multi-process launch: the torchrun-style environment ([`LaunchEnv`]) and a small TCP
//! rendezvous that hands a byte string from rank 0 to every other rank (the NCCL unique id).
//! Pure `std`, so it is tested without a GPU; the NCCL backend (feature `nccl`) builds on it.
//!
//! Wire protocol (one connection per non-root rank): the client sends `FSKP`, its rank and the
//! world size (u32 little-endian each); the server checks them and answers with a u32 length
//! and the payload. Every step has a deadline.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"FSKP";
const POLL: Duration = Duration::from_millis(20);
const MAX_PAYLOAD: u32 = 1 << 20;

/// Why the launch environment or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A required environment variable is not set.
    #[error("environment variable {var} is not set (launch with torchrun or set it)")]
    Missing {
        /// The variable.
        var: &'static str,
    },
    /// An environment variable does not parse.
    #[error("environment variable {var}={value:?} is not a valid {expected}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// `RANK` is not below `WORLD_SIZE`.
    #[error("RANK {rank} is not below WORLD_SIZE {world}")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The world size.
        world: usize,
    },
    /// A socket operation failed.
    #[error("rendezvous {step} with {addr} failed: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The address involved.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// A peer spoke the protocol wrongly or disagreed on the world.
    #[error("rendezvous at {addr}: {detail}")]
    Handshake {
        /// The server address.
        addr: String,
        /// What was wrong, naming the rank.
        detail: String,
    },
    /// The rendezvous did not finish in time.
    #[error("rendezvous at {addr} timed out after {waited:?} ({detail})")]
    Timeout {
        /// The server address.
        addr: String,
        /// How long was waited.
        waited: Duration,
        /// Who was missing or what was pending.
        detail: String,
    },
}

/// The process's place in a multi-process job, as torchrun sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`: global rank.
    pub rank: usize,
    /// `WORLD_SIZE`: number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: rank on this host (the GPU ordinal); defaults to `RANK`.
    pub local_rank: usize,
    /// `MASTER_ADDR`: host of rank 0.
    pub master_addr: String,
    /// `MASTER_PORT`: rendezvous port on rank 0.
    pub master_port: u16,
}

impl LaunchEnv {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` from the process
    /// environment.
    pub fn from_env() -> Result<Self, LaunchError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`LaunchEnv::from_env`] with another source of variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, LaunchError> {
        fn num<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            var: &'static str,
            expected: &'static str,
        ) -> Result<Option<T>, LaunchError> {
            match get(var) {
                None => Ok(None),
                Some(value) => value
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| LaunchError::Invalid {
                        var,
                        value,
                        expected,
                    }),
            }
        }
        let need = |v: Option<usize>, var| v.ok_or(LaunchError::Missing { var });
        let rank = need(num(&get, "RANK", "rank")?, "RANK")?;
        let world_size = need(num(&get, "WORLD_SIZE", "world size")?, "WORLD_SIZE")?;
        let local_rank = num(&get, "LOCAL_RANK", "local rank")?.unwrap_or(rank);
        let master_addr = get("MASTER_ADDR").ok_or(LaunchError::Missing { var: "MASTER_ADDR" })?;
        let master_port = num(&get, "MASTER_PORT", "port (0-65535)")?
            .ok_or(LaunchError::Missing { var: "MASTER_PORT" })?;
        if world_size == 0 {
            return Err(LaunchError::Invalid {
                var: "WORLD_SIZE",
                value: "0".to_owned(),
                expected: "positive world size",
            });
        }
        if rank >= world_size {
            return Err(LaunchError::RankOutOfRange {
                rank,
                world: world_size,
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Rank 0 serves `payload` at [`LaunchEnv::master`]; every other rank fetches it. All
    /// ranks return the payload. Fails (never hangs) after `timeout`.
    pub fn share_from_root(
        &self,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, LaunchError> {
        if self.world_size == 1 {
            return Ok(payload.to_vec());
        }
        if self.rank == 0 {
            let server = RendezvousServer::bind(&self.master())?;
            server.serve(self.world_size, payload, timeout)?;
            Ok(payload.to_vec())
        } else {
            fetch(&self.master(), self.rank, self.world_size, timeout)
        }
    }
}

fn io_err(step: &'static str, addr: &str) -> impl FnOnce(io::Error) -> LaunchError {
    move |source| LaunchError::Io {
        step,
        addr: addr.to_owned(),
        source,
    }
}

/// Rank 0's side of the rendezvous.
#[derive(Debug)]
pub struct RendezvousServer {
    listener: TcpListener,
    addr: String,
}

impl RendezvousServer {
    /// Listens on `addr` (`host:port`; port 0 picks a free one, see
    /// [`RendezvousServer::local_addr`]).
    pub fn bind(addr: &str) -> Result<Self, LaunchError> {
        let listener = TcpListener::bind(addr).map_err(io_err("bind", addr))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("configure", addr))?;
        let addr = listener
            .local_addr()
            .map_or_else(|_| addr.to_owned(), |a| a.to_string());
        Ok(Self { listener, addr })
    }

    /// The address clients should connect to.
    pub fn local_addr(&self) -> &str {
        &self.addr
    }

    /// Answers ranks `1..world` with `payload`, then returns. Fails on a bad or duplicate rank,
    /// a world-size disagreement, or when not all ranks arrive within `timeout`.
    pub fn serve(
        &self,
        world: usize,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), LaunchError> {
        let addr = self.addr.as_str();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or_else(|| LaunchError::Handshake {
                addr: addr.to_owned(),
                detail: format!("payload of {} bytes is too large", payload.len()),
            })?;
        let started = Instant::now();
        let mut seen = vec![false; world];
        seen[0] = true;
        while seen.iter().any(|s| !s) {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if started.elapsed() >= timeout {
                        let missing: Vec<usize> = (0..world).filter(|&r| !seen[r]).collect();
                        return Err(LaunchError::Timeout {
                            addr: addr.to_owned(),
                            waited: started.elapsed(),
                            detail: format!("ranks {missing:?} never connected"),
                        });
                    }
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) => return Err(io_err("accept", addr)(e)),
            };
            let remaining = timeout.saturating_sub(started.elapsed()).max(POLL);
            stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(remaining)))
                .and_then(|()| stream.set_write_timeout(Some(remaining)))
                .map_err(io_err("configure", addr))?;
            let mut hello = [0u8; 12];
            stream
                .read_exact(&mut hello)
                .map_err(io_err("read hello", addr))?;
            let bad = |detail: String| LaunchError::Handshake {
                addr: addr.to_owned(),
                detail: format!("{detail} (from {peer})"),
            };
            if &hello[..4] != MAGIC {
                return Err(bad("not a farskip rendezvous client".to_owned()));
            }
            let rank = u32_at(&hello, 4) as usize;
            let their_world = u32_at(&hello, 8) as usize;
            if their_world != world {
                return Err(bad(format!(
                    "rank {rank} has WORLD_SIZE {their_world}, rank 0 has {world}"
                )));
            }
            if rank == 0 || rank >= world {
                return Err(bad(format!("rank {rank} is not a rank 1..{world}")));
            }
            if seen[rank] {
                return Err(bad(format!("rank {rank} connected twice")));
            }
            seen[rank] = true;
            stream
                .write_all(&len.to_le_bytes())
                .and_then(|()| stream.write_all(payload))
                .map_err(io_err("send payload", addr))?;
        }
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A non-root rank's side: connects to `addr` (retrying until the server is up) and returns the
/// payload.
pub fn fetch(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    let started = Instant::now();
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| LaunchError::Handshake {
            addr: addr.to_owned(),
            detail: format!("{what} {v} does not fit the protocol"),
        })
    };
    let (rank32, world32) = (to_u32(rank, "rank")?, to_u32(world, "world size")?);
    let mut stream = loop {
        let last_err = match connect_once(addr, timeout) {
            Ok(s) => break s,
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(LaunchError::Timeout {
                addr: addr.to_owned(),
                waited: started.elapsed(),
                detail: format!("rank {rank} could not connect: {last_err}"),
            });
        }
        std::thread::sleep(POLL);
    };
    let remaining = timeout.saturating_sub(started.elapsed()).max(POLL);
    stream
        .set_read_timeout(Some(remaining))
        .and_then(|()| stream.set_write_timeout(Some(remaining)))
        .map_err(io_err("configure", addr))?;
    let mut hello = Vec::with_capacity(12);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&rank32.to_le_bytes());
    hello.extend_from_slice(&world32.to_le_bytes());
    stream
        .write_all(&hello)
        .map_err(io_err("send hello", addr))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .map_err(io_err("read payload length", addr))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(LaunchError::Handshake {
            addr: addr.to_owned(),
            detail: format!("server announced a payload of {len} bytes"),
        });
    }
    let mut payload = vec![0u8; len as usize];
    stream
        .read_exact(&mut payload)
        .map_err(io_err("read payload", addr))?;
    Ok(payload)
}

fn connect_once(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout.min(Duration::from_secs(5)).max(POLL)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn reads_torchrun_variables() -> Result<(), LaunchError> {
        let env = LaunchEnv::from_lookup(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))?;
        assert_eq!((env.rank, env.world_size, env.local_rank), (3, 4, 1));
        assert_eq!(env.master(), "node0:29500");
        Ok(())
    }

    #[test]
    fn bad_environment_names_the_variable() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")];
        let err = LaunchEnv::from_lookup(vars(&base));
        assert!(matches!(
            err,
            Err(LaunchError::Missing { var: "MASTER_PORT" })
        ));
        let err = LaunchEnv::from_lookup(vars(&[
            ("RANK", "x"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]));
        assert!(matches!(err, Err(LaunchError::Invalid { var: "RANK", .. })));
        let err = LaunchEnv::from_lookup(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]));
        assert!(matches!(
            err,
            Err(LaunchError::RankOutOfRange { rank: 2, world: 2 })
        ));
    }

    #[test]
    fn root_payload_reaches_every_rank() -> Result<(), LaunchError> {
        let server = RendezvousServer::bind("127.0.0.1:0")?;
        let addr = server.local_addr().to_owned();
        let payload: Vec<u8> = (0..128u8).collect();
        let world = 4;
        std::thread::scope(|s| {
            let clients: Vec<_> = (1..world)
                .map(|r| {
                    let addr = addr.clone();
                    s.spawn(move || fetch(&addr, r, world, Duration::from_secs(10)))
                })
                .collect();
            server.serve(world, &payload, Duration::from_secs(10))?;
            for c in clients {
                let got = c.join().map_err(|_| LaunchError::Handshake {
                    addr: addr.clone(),
                    detail: "client thread panicked".to_owned(),
                })??;
                assert_eq!(got, payload);
            }
            Ok(())
        })
    }

    #[test]
    fn missing_ranks_time_out_with_their_names() -> Result<(), LaunchError> {
        let server = RendezvousServer::bind("127.0.0.1:0")?;
        let started = Instant::now();
        let err = server.serve(3, b"id", Duration::from_millis(150));
        assert!(started.elapsed() < Duration::from_secs(5));
        match err {
            Err(LaunchError::Timeout { detail, .. }) => assert!(detail.contains("[1, 2]")),
            other => panic!("expected a timeout, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn world_size_disagreement_is_reported() -> Result<(), LaunchError> {
        let server = RendezvousServer::bind("127.0.0.1:0")?;
        let addr = server.local_addr().to_owned();
        std::thread::scope(|s| {
            let client = s.spawn(|| fetch(&addr, 1, 3, Duration::from_secs(5)));
            let err = server.serve(2, b"id", Duration::from_secs(5));
            assert!(
                matches!(&err, Err(LaunchError::Handshake { detail, .. }) if detail.contains("WORLD_SIZE 3")),
                "{err:?}"
            );
            // The client sees the connection close without a payload.
            assert!(client.join().is_ok_and(|r| r.is_err()));
        });
        Ok(())
    }
}
