//! How the processes of a tensor-parallel group spanning hosts find each other: rank 0
//! listens on a TCP address every rank is given (`--tp-rendezvous HOST:PORT`) and hands
//! each other rank the group's NCCL unique id (128 bytes) and the world size, so that all
//! can make their communicator (`ncclCommInitRank`). Only the id travels here; NCCL makes
//! its own connections afterwards.
//!
//! Each other rank sends its rank (u32, little-endian); rank 0 checks it (in range, not
//! yet seen) and answers with the world size (u32) and the id, or closes the connection,
//! so a mis-launched group fails at start with a message, not later in a collective.

use crate::{CudaError, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn err(what: String) -> CudaError {
    CudaError::Input(format!("tensor-parallel rendezvous: {what}"))
}

/// Rank 0's side: serves `id` to the `world - 1` other ranks connecting to `addr` within
/// `timeout`.
pub fn serve(addr: &str, world: usize, id: &[u8; ID_BYTES], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(addr).map_err(|e| err(format!("rank 0 cannot listen on {addr}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut seen = vec![false; world];
    seen[0] = true;
    while seen.iter().any(|s| !s) {
        let (mut stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !seen[r]).collect();
                    return Err(err(format!("ranks {missing:?} did not connect to {addr} within {} s", timeout.as_secs())));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(err(e.to_string())),
        };
        stream.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
        // A rank sends its 4 bytes at once; a silent connection is not one of ours (a port
        // scan, a half-open connection) and is dropped after 2 s.
        stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| err(e.to_string()))?;
        let mut rank = [0u8; 4];
        if stream.read_exact(&mut rank).is_err() {
            continue;
        }
        let rank = u32::from_le_bytes(rank) as usize;
        if rank == 0 || rank >= world || seen[rank] {
            let why = if rank == 0 || rank >= world { format!("a process says it is rank {rank} of {world} (from {peer})") } else { format!("rank {rank} connected twice (from {peer})") };
            return Err(err(why));
        }
        let mut reply = (world as u32).to_le_bytes().to_vec();
        reply.extend_from_slice(id);
        stream.write_all(&reply).map_err(|e| err(format!("answering rank {rank}: {e}")))?;
        seen[rank] = true;
    }
    Ok(())
}

/// Another rank's side: fetches the id from rank 0 at `addr`, retrying until `timeout`
/// (rank 0 may start later), and checks that rank 0 has the same world size.
pub fn fetch(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    if rank == 0 || rank >= world {
        return Err(err(format!("rank {rank} is not one of ranks 1..{world} that fetch the id")));
    }
    let deadline = Instant::now() + timeout;
    let targets: Vec<std::net::SocketAddr> = addr.to_socket_addrs().map_err(|e| err(format!("{addr}: {e}")))?.collect();
    if targets.is_empty() {
        return Err(err(format!("{addr} resolves to nothing")));
    }
    for attempt in 0usize.. {
        // Every address the name resolves to, in turn (localhost: ::1 and 127.0.0.1).
        let target = targets[attempt % targets.len()];
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
                stream.write_all(&(rank as u32).to_le_bytes()).map_err(|e| err(e.to_string()))?;
                let mut reply = [0u8; 4 + ID_BYTES];
                stream.read_exact(&mut reply).map_err(|e| err(format!("rank 0 at {addr} refused rank {rank} or closed: {e}")))?;
                let theirs = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
                if theirs != world {
                    return Err(err(format!("rank 0 runs {theirs} ranks, this process was started for {world}")));
                }
                let mut id = [0u8; ID_BYTES];
                id.copy_from_slice(&reply[4..]);
                return Ok(id);
            }
            Err(e) => {
                if Instant::now() > deadline {
                    return Err(err(format!("rank 0 did not answer at {addr} within {} s: {e}", timeout.as_secs())));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let addr = free_addr();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 7 % 251) as u8);
        std::thread::scope(|s| {
            // The other ranks start first and wait for rank 0.
            let fetchers: Vec<_> = (1..4).map(|r| { let a = addr.clone(); s.spawn(move || fetch(&a, r, 4, Duration::from_secs(10))) }).collect();
            std::thread::sleep(Duration::from_millis(200));
            serve(&addr, 4, &id, Duration::from_secs(10)).expect("serve");
            for f in fetchers {
                assert_eq!(f.join().expect("thread").expect("fetch"), id);
            }
        });
    }

    #[test]
    fn a_silent_stranger_does_not_stop_the_group() {
        let addr = free_addr();
        let id = [9u8; ID_BYTES];
        std::thread::scope(|s| {
            let a = addr.clone();
            let server = s.spawn(move || serve(&a, 2, &id, Duration::from_secs(10)));
            std::thread::sleep(Duration::from_millis(100));
            let _stranger = TcpStream::connect(&addr).expect("connect");
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(fetch(&addr, 1, 2, Duration::from_secs(10)).expect("fetch"), id);
            server.join().expect("thread").expect("served");
        });
    }

    #[test]
    fn a_mis_launched_group_fails_at_start_with_a_message() {
        let id = [3u8; ID_BYTES];
        // A rank started for a different world size.
        let addr = free_addr();
        std::thread::scope(|s| {
            let a = addr.clone();
            let server = s.spawn(move || serve(&a, 2, &id, Duration::from_secs(5)));
            let got = fetch(&addr, 1, 3, Duration::from_secs(5));
            assert!(got.unwrap_err().to_string().contains("rank 0 runs 2 ranks"));
            server.join().expect("thread").expect("rank 1 was served");
        });
        // The same rank twice.
        let addr = free_addr();
        std::thread::scope(|s| {
            let a = addr.clone();
            let server = s.spawn(move || serve(&a, 3, &id, Duration::from_secs(5)));
            std::thread::sleep(Duration::from_millis(100));
            let first = fetch(&addr, 1, 3, Duration::from_secs(5));
            assert!(first.is_ok());
            let _ = fetch(&addr, 1, 3, Duration::from_secs(2));
            let e = server.join().expect("thread").unwrap_err().to_string();
            assert!(e.contains("rank 1 connected twice"), "{e}");
        });
        // Nobody comes.
        let addr = free_addr();
        let e = serve(&addr, 2, &id, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("ranks [1] did not connect"), "{e}");
        assert!(fetch(&addr, 0, 2, Duration::from_secs(1)).is_err(), "rank 0 does not fetch");
    }
}
