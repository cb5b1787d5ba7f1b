//! How the processes of a tensor-parallel group spanning hosts find each other: rank 0
//! listens on a TCP address every rank is given (`--tp-rendezvous HOST:PORT`) and hands
//! each other rank the group's NCCL unique id (128 bytes) and the world size, so that all
//! can make their communicator (`ncclCommInitRank`). Only the id travels here; NCCL makes
//! its own connections afterwards.
//!
//! Each other rank sends its rank (u32, little-endian); rank 0 checks it (in range, not
//! yet seen) and answers with the world size (u32) and the id, or closes the connection,
//! so a mis-launched group fails at start with a message, not later in a collective.
//!
//! The connections stay open afterwards as the group's alarm ([`Watch`]): a rank whose
//! GPU work failed, or whose process ended without saying goodbye, would otherwise leave
//! the other processes waiting in a collective for ever (NCCL does not notice a peer
//! process that is gone). Over them a rank says "abort" (one byte `A`) or "leaving" (`B`);
//! rank 0, which holds a connection to every other rank, passes an alarm on to all.

use crate::{CudaError, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

fn err(what: String) -> CudaError {
    CudaError::Input(format!("tensor-parallel rendezvous: {what}"))
}

/// Rank 0's side: serves `id` to the `world - 1` other ranks connecting to `addr` within
/// `timeout`; the connections (rank, stream), in rank order, for the group's [`Watch`].
pub fn serve(addr: &str, world: usize, id: &[u8; ID_BYTES], timeout: Duration) -> Result<Vec<(usize, TcpStream)>> {
    let listener = TcpListener::bind(addr).map_err(|e| err(format!("rank 0 cannot listen on {addr}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut seen = vec![false; world];
    seen[0] = true;
    let mut peers = Vec::with_capacity(world.saturating_sub(1));
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
        peers.push((rank, stream));
    }
    peers.sort_by_key(|(r, _)| *r);
    Ok(peers)
}

/// Another rank's side: fetches the id from rank 0 at `addr`, retrying until `timeout`
/// (rank 0 may start later), and checks that rank 0 has the same world size; the id and
/// the connection to rank 0, for the group's [`Watch`].
pub fn fetch(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<([u8; ID_BYTES], TcpStream)> {
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
                return Ok((id, stream));
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

/// What a rank says to another over the rendezvous connection.
const ABORT: u8 = b'A';
const LEAVING: u8 = b'B';

/// The group's alarm over the rendezvous connections (see the module's documentation).
/// Started by every rank with its connections (rank 0: one per other rank; the others: the
/// one to rank 0) and what to do on an alarm (abort this process's communicator, which ends
/// its waits in collectives with an error). Dropping it says "leaving" to every peer, so that
/// a clean end is not taken for a failure.
pub struct Watch {
    peers: Vec<(usize, TcpStream)>,
    /// An alarm was raised or received: each process acts on one, once.
    fired: AtomicBool,
    /// Set when this process ends its part: its own closed connections are no alarm.
    closing: Arc<AtomicBool>,
    on_alarm: Box<dyn Fn(String) + Send + Sync>,
}

impl Watch {
    /// Watches `peers` (rank, connection) from a thread each; `on_alarm(why)` runs once, on
    /// the first alarm: a peer says abort, or its connection ends without its goodbye.
    pub fn start(peers: Vec<(usize, TcpStream)>, on_alarm: impl Fn(String) + Send + Sync + 'static) -> Result<Arc<Watch>> {
        for (_, s) in &peers {
            // The handshake's timeouts end here: a peer may stay silent for a whole run.
            s.set_read_timeout(None).map_err(|e| err(e.to_string()))?;
            s.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        }
        let readers = peers.iter().map(|(r, s)| s.try_clone().map(|s| (*r, s))).collect::<std::io::Result<Vec<_>>>().map_err(|e| err(e.to_string()))?;
        let watch = Arc::new(Watch { peers, fired: AtomicBool::new(false), closing: Arc::new(AtomicBool::new(false)), on_alarm: Box::new(on_alarm) });
        for (rank, mut stream) in readers {
            // A reader holds the watch weakly: dropping the last owner ends the watch.
            let weak = Arc::downgrade(&watch);
            let closing = watch.closing.clone();
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                let why = loop {
                    match stream.read(&mut byte) {
                        Ok(1) if byte[0] == LEAVING => return,
                        Ok(1) if byte[0] == ABORT => break format!("rank {rank} reported an error"),
                        Ok(1) => continue,
                        _ => break format!("the connection to rank {rank} ended (its process stopped)"),
                    }
                };
                if closing.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(w) = weak.upgrade() {
                    w.alarm(why);
                }
            });
        }
        Ok(watch)
    }

    /// Raises the alarm for a failure of this process: every peer is told, once (rank 0's
    /// peers are all the others; another rank's alarm reaches them through rank 0).
    pub fn raise(&self) {
        self.fire();
    }

    /// An alarm from a peer: passed on to every peer (rank 0 relays it), then acted on.
    fn alarm(&self, why: String) {
        if self.fire() {
            (self.on_alarm)(why);
        }
    }

    /// Tells every peer to abort, the first time only; whether this was the first.
    fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::SeqCst);
        if first {
            self.tell(ABORT);
        }
        first
    }

    /// Whether an alarm was raised here or received.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    fn tell(&self, what: u8) {
        for (_, stream) in &self.peers {
            let mut s: &TcpStream = stream;
            // A peer already gone needs no message.
            let _ = s.write_all(&[what]);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        if !self.fired.load(Ordering::SeqCst) {
            self.tell(LEAVING);
        }
        for (_, s) in &self.peers {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
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
            let peers = serve(&addr, 4, &id, Duration::from_secs(10)).expect("serve");
            assert_eq!(peers.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [1, 2, 3], "rank 0 keeps a connection to each, in rank order");
            for f in fetchers {
                assert_eq!(f.join().expect("thread").expect("fetch").0, id);
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
            assert_eq!(fetch(&addr, 1, 2, Duration::from_secs(10)).expect("fetch").0, id);
            server.join().expect("thread").expect("served");
        });
    }

    /// A group of `world` ranks in this process: rank 0's connections, and each other
    /// rank's connection to rank 0.
    fn group(world: usize) -> (Vec<(usize, TcpStream)>, Vec<TcpStream>) {
        let addr = free_addr();
        let id = [1u8; ID_BYTES];
        std::thread::scope(|s| {
            let fetchers: Vec<_> = (1..world).map(|r| { let a = addr.clone(); s.spawn(move || fetch(&a, r, world, Duration::from_secs(10))) }).collect();
            let peers = serve(&addr, world, &id, Duration::from_secs(10)).expect("serve");
            (peers, fetchers.into_iter().map(|f| f.join().expect("thread").expect("fetch").1).collect())
        })
    }

    type Alarms = Arc<std::sync::Mutex<Vec<String>>>;

    fn watch(peers: Vec<(usize, TcpStream)>) -> (Arc<Watch>, Alarms) {
        let alarms: Alarms = Default::default();
        let a = alarms.clone();
        (Watch::start(peers, move |why| a.lock().expect("lock").push(why)).expect("watch"), alarms)
    }

    /// Waits up to 5 s for every alarm list to hold exactly one alarm, then a moment more
    /// (a second alarm would come within it); the alarms.
    fn one_each(alarms: &[&Alarms]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alarms.iter().any(|a| a.lock().expect("lock").is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        alarms.iter().map(|a| { let a = a.lock().expect("lock"); assert_eq!(a.len(), 1, "{a:?}"); a[0].clone() }).collect()
    }

    #[test]
    fn a_rank_whose_process_stops_alarms_every_other_rank() {
        let (peers, mut others) = group(3);
        let (_w0, a0) = watch(peers);
        let (_w1, a1) = watch(vec![(0, others.remove(0))]);
        // Rank 2's process ends without a word: its connection closes.
        drop(others);
        let got = one_each(&[&a0, &a1]);
        assert!(got[0].contains("rank 2") && got[0].contains("ended"), "{got:?}");
        assert!(got[1].contains("rank 0 reported an error"), "rank 0 passes the alarm on: {got:?}");
    }

    #[test]
    fn an_error_on_one_rank_alarms_the_others_once() {
        let (peers, mut others) = group(3);
        let (w0, a0) = watch(peers);
        let (_w1, a1) = watch(vec![(0, others.remove(0))]);
        let (w2, a2) = watch(vec![(0, others.remove(0))]);
        w2.raise();
        w2.raise();
        let got = one_each(&[&a0, &a1]);
        assert!(got[0].contains("rank 2 reported an error") && got[1].contains("rank 0 reported an error"), "{got:?}");
        assert!(a2.lock().expect("lock").is_empty(), "the rank that raised it acts by itself");
        assert!(w0.fired() && w2.fired());
    }

    #[test]
    fn a_clean_end_is_no_alarm() {
        let (peers, mut others) = group(3);
        let (w0, a0) = watch(peers);
        let (w1, a1) = watch(vec![(0, others.remove(0))]);
        let (w2, a2) = watch(vec![(0, others.remove(0))]);
        // Rank 0 ends first, then the others, as a finished run's processes do in any order.
        drop(w0);
        std::thread::sleep(Duration::from_millis(100));
        drop(w2);
        drop(w1);
        std::thread::sleep(Duration::from_millis(300));
        for a in [&a0, &a1, &a2] {
            assert!(a.lock().expect("lock").is_empty(), "{:?}", a.lock().expect("lock"));
        }
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
