//! Collectives run in submission order on a thread of their own, so the training thread can
//! compute while they travel (ZeRO-3's prefetch of the next layer's weights and its reduce of
//! the last layer's gradients). The caller takes the results back in the same order.
//!
//! Every rank must submit the same collectives in the same order (the ZeRO-3 layer walk does).
//! While a queue runs, only its thread calls collectives on this rank, so the watchdog still
//! watches one collective at a time. The thread waits for the other ranks without taking a
//! core from the training thread (`Collectives::*_background`).
use super::Dist;
use crate::{Error, Result};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

/// Which collective a buffer takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// The sum onto `root` (the other ranks' buffer comes back unspecified).
    Reduce { root: usize },
    /// `root`'s buffer onto every rank.
    Broadcast { root: usize },
}

impl Collective {
    /// Run it now on the calling thread (`background`: waiting as a background thread does).
    pub fn run(self, dist: &Dist, buf: &mut [f32], background: bool) -> Result<()> {
        match (self, background) {
            (Collective::Reduce { root }, true) => dist.reduce_sum_background(buf, root),
            (Collective::Reduce { root }, false) => dist.reduce_sum(buf, root),
            (Collective::Broadcast { root }, true) => dist.broadcast_background(buf, root),
            (Collective::Broadcast { root }, false) => dist.broadcast(buf, root),
        }
    }
}

/// A queue of collectives with a thread of its own (see the module docs).
pub struct Background {
    tx: Option<Sender<(Collective, Vec<f32>)>>,
    done: Receiver<Result<(Vec<f32>, f64)>>,
    thread: Option<JoinHandle<()>>,
    waiting: usize,
    /// Seconds the thread spent in the collectives taken back so far.
    in_collectives_s: f64,
    /// Seconds the caller waited in [`Background::take_next`].
    waited_s: f64,
}

impl Background {
    pub fn start(dist: &Dist) -> Result<Self> {
        let (tx, rx) = channel::<(Collective, Vec<f32>)>();
        let (done_tx, done) = channel::<Result<(Vec<f32>, f64)>>();
        let dist = dist.clone();
        let thread = std::thread::Builder::new()
            .name("ferrotune-comm".into())
            .spawn(move || {
                if let Err(e) = dist.prepare_thread() {
                    let _ = done_tx.send(Err(e));
                    return;
                }
                for (op, mut buf) in rx {
                    let t0 = Instant::now();
                    let r = op
                        .run(&dist, &mut buf, true)
                        .map(|_| (buf, t0.elapsed().as_secs_f64()));
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::msg(format!("cannot start the communication thread: {e}")))?;
        Ok(Background {
            tx: Some(tx),
            done,
            thread: Some(thread),
            waiting: 0,
            in_collectives_s: 0.0,
            waited_s: 0.0,
        })
    }

    /// Queue `op` on `buf`.
    pub fn submit(&mut self, op: Collective, buf: Vec<f32>) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(ended)?;
        tx.send((op, buf)).map_err(|_| ended())?;
        self.waiting += 1;
        Ok(())
    }

    /// The oldest submitted collective's buffer once it is done (blocks until then).
    pub fn take_next(&mut self) -> Result<Vec<f32>> {
        if self.waiting == 0 {
            return Err(Error::msg("no collective is waiting"));
        }
        let t0 = Instant::now();
        let (buf, secs) = self.done.recv().map_err(|_| ended())??;
        self.waited_s += t0.elapsed().as_secs_f64();
        self.in_collectives_s += secs;
        self.waiting -= 1;
        Ok(buf)
    }

    /// Submitted collectives not yet taken back.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Seconds the thread spent in the collectives taken back so far, and seconds the caller
    /// waited for them.
    pub fn times(&self) -> (f64, f64) {
        (self.in_collectives_s, self.waited_s)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        drop(self.tx.take());
        // Everything was taken back: the thread is idle and ends now. Otherwise the step
        // failed, the caller ends the job, and the thread may be waiting for ranks that will
        // not come: leave it.
        if let Some(t) = self.thread.take().filter(|_| self.waiting == 0) {
            let _ = t.join();
        }
    }
}

fn ended() -> Error {
    Error::msg("the communication thread ended early (an earlier collective failed)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_gets_its_buffers_back_in_order() {
        let d = Dist::default();
        let mut q = Background::start(&d).unwrap();
        q.submit(Collective::Broadcast { root: 0 }, vec![1.0, 2.0])
            .unwrap();
        q.submit(Collective::Reduce { root: 0 }, vec![3.0]).unwrap();
        assert_eq!(q.waiting(), 2);
        assert_eq!(q.take_next().unwrap(), [1.0, 2.0]);
        assert_eq!(q.take_next().unwrap(), [3.0]);
        assert_eq!(q.waiting(), 0);
        assert!(q.take_next().is_err(), "nothing is waiting");
    }

    #[test]
    fn a_bad_root_is_an_error_not_a_hang() {
        let d = Dist::default();
        let mut q = Background::start(&d).unwrap();
        let r = q
            .submit(Collective::Reduce { root: 3 }, vec![1.0])
            .and_then(|_| q.take_next());
        assert!(r.is_err());
        // The thread has ended: later submissions fail too.
        let again = q
            .submit(Collective::Reduce { root: 0 }, vec![1.0])
            .and_then(|_| q.take_next());
        assert!(again.is_err());
    }
}
