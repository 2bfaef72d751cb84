//! The torchrun-style rendezvous: rank 0 hands a few bytes (NCCL's unique id) to every other
//! rank over one TCP connection each, at `MASTER_ADDR:MASTER_PORT`. This is the whole of the
//! bootstrap NCCL needs (its own transports do the rest); it is not a collectives layer.
//!
//! Rank 0 listens and serves every rank that says hello, until all `world - 1` have; the other
//! ranks retry the connection until rank 0 listens. Both sides give up at the deadline with an
//! error naming the address and the ranks still missing. A hello with another world size or an
//! impossible rank is refused with an error on both sides (two jobs sharing one port, or a rank
//! started with the wrong environment).
use crate::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Where the ranks meet: torchrun's `MASTER_ADDR` / `MASTER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub addr: String,
    pub port: u16,
}

/// What a rank sends first: the protocol, its rank and the world size it was started with.
const MAGIC: &[u8; 8] = b"FTRDZV01";
/// The largest answer accepted (the NCCL id is 128 bytes; an error message a line).
const MAX_ANSWER: usize = 64 * 1024;
/// The most ranks a job may have (rank 0 keeps one flag per rank; NCCL's own limit is lower).
const MAX_WORLD: usize = 1 << 20;
/// How long a rank waits between attempts to reach rank 0.
const RETRY: Duration = Duration::from_millis(100);

impl Rendezvous {
    /// From `MASTER_ADDR` / `MASTER_PORT` (default port 29500, torchrun's); `None` without
    /// `MASTER_ADDR`.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(addr) = get("MASTER_ADDR").map(|a| a.trim().to_string()) else {
            return Ok(None);
        };
        if addr.is_empty() {
            return Err(Error::msg(
                "MASTER_ADDR is empty: set it to rank 0's host name or address",
            ));
        }
        let port = match get("MASTER_PORT") {
            None => 29500,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(Error::msg(format!(
                        "MASTER_PORT `{p}`: expected a port number from 1 to 65535"
                    )))
                }
            },
        };
        Ok(Some(Rendezvous { addr, port }))
    }

    fn shown(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }

    /// Rank 0 makes the bytes with `make` and gives them to every other rank; the others return
    /// what rank 0 sent. Everyone returns the same bytes, or an error by `timeout`.
    pub fn share(
        &self,
        rank: usize,
        world: usize,
        make: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if world == 0 || rank >= world {
            return Err(Error::msg(format!(
                "rendezvous: rank {rank} of {world} ranks is not a rank of the job"
            )));
        }
        if world > MAX_WORLD {
            return Err(Error::msg(format!(
                "rendezvous: WORLD_SIZE {world} is more than the {MAX_WORLD} ranks a job may have"
            )));
        }
        let deadline = Instant::now() + timeout;
        if rank == 0 {
            // Listen before making the bytes, so a taken port is the first error seen.
            let listener = self.listen()?;
            let blob = make()?;
            if blob.len() > MAX_ANSWER {
                return Err(Error::msg("rendezvous: the shared value is too large"));
            }
            self.serve(listener, &blob, world, deadline)?;
            Ok(blob)
        } else {
            self.ask(rank, world, deadline)
        }
    }

    fn listen(&self) -> Result<TcpListener> {
        // Every interface, as torchrun's store: MASTER_ADDR is how the others reach this
        // machine, which need not be an address of one of its interfaces (NAT, a DNS alias).
        let listener = TcpListener::bind(("0.0.0.0", self.port)).map_err(|e| {
            Error::msg(format!(
                "rendezvous: rank 0 cannot listen on port {} (MASTER_PORT): {e}",
                self.port
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::msg(format!("rendezvous: port {}: {e}", self.port)))?;
        Ok(listener)
    }

    /// Rank 0: answer hellos until every other rank has had the bytes.
    fn serve(
        &self,
        listener: TcpListener,
        blob: &[u8],
        world: usize,
        deadline: Instant,
    ) -> Result<()> {
        let mut served = vec![false; world];
        served[0] = true;
        while served.iter().any(|s| !s) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::msg(format!(
                    "rendezvous at {}: rank(s) {} of {world} did not connect in time (are they running, with the same MASTER_ADDR and MASTER_PORT?)",
                    self.shown(),
                    missing(&served)
                )));
            }
            let (mut stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(Error::msg(format!("rendezvous at {}: {e}", self.shown()))),
            };
            // A connection that says nothing within a few seconds is not one of ours (a port
            // scanner, a health check): drop it and keep waiting.
            let wait = (deadline - now).min(Duration::from_secs(5));
            let hello = stream
                .set_nonblocking(false)
                .and_then(|_| stream.set_read_timeout(Some(wait)))
                .and_then(|_| stream.set_write_timeout(Some(wait)))
                .and_then(|_| {
                    let mut h = [0u8; 16];
                    stream.read_exact(&mut h).map(|_| h)
                });
            let Ok(hello) = hello else { continue };
            if &hello[..8] != MAGIC {
                continue;
            }
            let [_, _, _, _, _, _, _, _, r0, r1, r2, r3, w0, w1, w2, w3] = hello;
            let their_rank = u32::from_le_bytes([r0, r1, r2, r3]) as usize;
            let their_world = u32::from_le_bytes([w0, w1, w2, w3]) as usize;
            let refusal = if their_world != world {
                Some(format!(
                    "rank {their_rank} (from {peer}) was started for {their_world} ranks, rank 0 for {world}"
                ))
            } else if their_rank == 0 || their_rank >= world {
                Some(format!(
                    "a process at {peer} says it is rank {their_rank} of {world}"
                ))
            } else if served.get(their_rank).copied().unwrap_or(true) {
                Some(format!(
                    "two processes say they are rank {their_rank} (the second from {peer})"
                ))
            } else {
                None
            };
            if let Some(why) = refusal {
                let _ = answer(&mut stream, 1, why.as_bytes());
                return Err(Error::msg(format!("rendezvous at {}: {why}", self.shown())));
            }
            if answer(&mut stream, 0, blob).is_ok() {
                if let Some(s) = served.get_mut(their_rank) {
                    *s = true;
                }
            }
        }
        Ok(())
    }

    /// Any other rank: reach rank 0 (retrying until it listens) and read its answer.
    fn ask(&self, rank: usize, world: usize, deadline: Instant) -> Result<Vec<u8>> {
        let addrs: Vec<SocketAddr> = (self.addr.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::msg(format!(
                    "rendezvous: MASTER_ADDR `{}` does not resolve: {e}",
                    self.addr
                ))
            })?
            .collect();
        let mut last_error = String::from("no address");
        loop {
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let mut stream =
                    match TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                        Ok(s) => s,
                        Err(e) => {
                            last_error = e.to_string();
                            continue;
                        }
                    };
                match self.exchange(&mut stream, rank, world, deadline) {
                    Ok(Answer::Value(v)) => return Ok(v),
                    Ok(Answer::Refused(why)) => {
                        return Err(Error::msg(format!(
                            "rendezvous at {}: rank 0 refused rank {rank}: {why}",
                            self.shown()
                        )))
                    }
                    // Rank 0 closed the connection early (it was restarting, or this was
                    // another program on the port): try again.
                    Err(e) => last_error = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "rendezvous: rank {rank} of {world} could not reach rank 0 at {} in time ({last_error}); is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same on every rank?",
                    self.shown()
                )));
            }
            std::thread::sleep(RETRY);
        }
    }

    fn exchange(
        &self,
        stream: &mut TcpStream,
        rank: usize,
        world: usize,
        deadline: Instant,
    ) -> std::io::Result<Answer> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))?;
        let mut hello = [0u8; 16];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
        hello[12..16].copy_from_slice(&(world as u32).to_le_bytes());
        stream.write_all(&hello)?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head)?;
        let [status, l0, l1, l2, l3] = head;
        let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
        if len > MAX_ANSWER {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("an answer of {len} bytes is not rank 0's"),
            ));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        Ok(match status {
            0 => Answer::Value(body),
            _ => Answer::Refused(String::from_utf8_lossy(&body).into_owned()),
        })
    }
}

enum Answer {
    Value(Vec<u8>),
    Refused(String),
}

/// Status byte, length, bytes.
fn answer(stream: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(5 + body.len());
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)?;
    stream.flush()
}

/// `1, 3` for the ranks not yet served.
fn missing(served: &[bool]) -> String {
    served
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(r, _)| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn at(port: u16) -> Rendezvous {
        Rendezvous {
            addr: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let port = free_port();
        let world = 4;
        // Peers first: they must wait for rank 0 to listen.
        let peers: Vec<_> = (1..world)
            .map(|r| {
                thread::spawn(move || {
                    at(port).share(
                        r,
                        world,
                        || panic!("only rank 0 makes the value"),
                        Duration::from_secs(20),
                    )
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        let made = at(port)
            .share(
                0,
                world,
                || Ok((0..128u8).collect()),
                Duration::from_secs(20),
            )
            .unwrap();
        assert_eq!(made, (0..128u8).collect::<Vec<_>>());
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), made);
        }
    }

    #[test]
    fn a_missing_rank_is_named_at_the_deadline() {
        let port = free_port();
        let peer =
            thread::spawn(move || at(port).share(1, 3, || unreachable!(), Duration::from_secs(20)));
        let t0 = Instant::now();
        let e = at(port)
            .share(0, 3, || Ok(vec![7; 4]), Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(e.contains("rank(s) 2 of 3 did not connect"), "{e}");
        assert_eq!(peer.join().unwrap().unwrap(), vec![7; 4]);
    }

    #[test]
    fn no_rank_zero_is_an_error_in_time() {
        let port = free_port();
        let t0 = Instant::now();
        let e = at(port)
            .share(1, 2, || unreachable!(), Duration::from_millis(800))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(8));
        assert!(
            e.contains("rank 1 of 2 could not reach rank 0 at 127.0.0.1:"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_of_another_world_size_is_refused_on_both_sides() {
        let port = free_port();
        let peer =
            thread::spawn(move || at(port).share(1, 3, || unreachable!(), Duration::from_secs(20)));
        let e = at(port)
            .share(0, 2, || Ok(vec![1]), Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 1 (from 127.0.0.1:"), "{e}");
        assert!(e.contains("was started for 3 ranks, rank 0 for 2"), "{e}");
        let e = peer.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 0 refused rank 1"), "{e}");
    }

    #[test]
    fn a_stray_connection_does_not_stop_the_rendezvous() {
        let port = free_port();
        let root = thread::spawn(move || {
            at(port).share(0, 2, || Ok(vec![9; 16]), Duration::from_secs(20))
        });
        thread::sleep(Duration::from_millis(200));
        // Something else on the port: wrong greeting, then gone.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        drop(s);
        let got = at(port)
            .share(1, 2, || unreachable!(), Duration::from_secs(20))
            .unwrap();
        assert_eq!(got, vec![9; 16]);
        assert_eq!(root.join().unwrap().unwrap(), vec![9; 16]);
    }

    #[test]
    fn an_absurd_answer_is_refused_before_allocating() {
        // Something on the port that answers every hello with a 2 GiB length: never read,
        // the rank gives up at its deadline.
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut hello = [0u8; 16];
                let _ = s.read_exact(&mut hello);
                let _ = s.write_all(&[0, 0xff, 0xff, 0xff, 0x7f]);
            }
        });
        let t0 = Instant::now();
        let e = at(port)
            .share(1, 2, || unreachable!(), Duration::from_millis(800))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(8));
        assert!(e.contains("is not rank 0's"), "{e}");
    }

    #[test]
    fn the_environment_is_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Rendezvous::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            Rendezvous::from_vars(vars(&[("MASTER_ADDR", "node1")])).unwrap(),
            Some(Rendezvous {
                addr: "node1".into(),
                port: 29500
            })
        );
        assert_eq!(
            Rendezvous::from_vars(vars(&[
                ("MASTER_ADDR", "10.0.0.2"),
                ("MASTER_PORT", "1234")
            ]))
            .unwrap()
            .unwrap()
            .port,
            1234
        );
        let e = Rendezvous::from_vars(vars(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT `70000`"), "{e}");
        let e = Rendezvous::from_vars(vars(&[("MASTER_ADDR", " ")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR is empty"), "{e}");
        let e = Rendezvous {
            addr: "no-such-host.invalid".into(),
            port: 1,
        }
        .share(1, 2, || unreachable!(), Duration::from_secs(1))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MASTER_ADDR `no-such-host.invalid` does not resolve"),
            "{e}"
        );
    }
}
