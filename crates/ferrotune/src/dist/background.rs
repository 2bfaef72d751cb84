//! Collectives run in submission order on a thread of their own, so the training thread can
//! compute while they travel (ZeRO-3's prefetch of the next layer's weights and its reduce of
//! the last layer's gradients). The caller takes the results back in the same order.
//!
//! Every rank must submit the same collectives in the same order (the ZeRO-3 layer walk does).
//! While a queue runs, only its thread calls collectives on this rank, so the watchdog still
//! watches one collective at a time. The thread waits for the other ranks without spinning
//! (`Collectives::*_background`). [`Background::inline`] runs each collective at submission,
//! on the caller's thread: the same results, no thread (one process, or overlap turned off).
use super::Dist;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

/// Which collective a buffer takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// The sum onto `root` (the other ranks' buffer comes back unspecified).
    Reduce { root: usize },
    /// `root`'s buffer onto every rank.
    Broadcast { root: usize },
}

fn run(dist: &Dist, op: Collective, buf: &mut [f32], background: bool) -> Result<()> {
    match (op, background) {
        (Collective::Reduce { root }, true) => dist.reduce_sum_background(buf, root),
        (Collective::Reduce { root }, false) => dist.reduce_sum(buf, root),
        (Collective::Broadcast { root }, true) => dist.broadcast_background(buf, root),
        (Collective::Broadcast { root }, false) => dist.broadcast(buf, root),
    }
}

/// A queue of collectives (see the module docs).
pub struct Background {
    mode: Mode,
}

enum Mode {
    Inline {
        dist: Dist,
        done: VecDeque<Vec<f32>>,
    },
    Thread {
        tx: Option<Sender<(Collective, Vec<f32>)>>,
        done: Receiver<Result<Vec<f32>>>,
        thread: Option<JoinHandle<()>>,
        waiting: usize,
    },
}

impl Background {
    /// A queue with a thread of its own.
    pub fn start(dist: &Dist) -> Result<Self> {
        let (tx, rx) = channel::<(Collective, Vec<f32>)>();
        let (done_tx, done) = channel::<Result<Vec<f32>>>();
        let dist = dist.clone();
        let thread = std::thread::Builder::new()
            .name("ferrotune-comm".into())
            .spawn(move || {
                if let Err(e) = dist.prepare_thread() {
                    let _ = done_tx.send(Err(e));
                    return;
                }
                for (op, mut buf) in rx {
                    let r = run(&dist, op, &mut buf, true).map(|_| buf);
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::msg(format!("cannot start the communication thread: {e}")))?;
        Ok(Background {
            mode: Mode::Thread {
                tx: Some(tx),
                done,
                thread: Some(thread),
                waiting: 0,
            },
        })
    }

    /// A queue that runs each collective when it is submitted, on the caller's thread.
    pub fn inline(dist: &Dist) -> Self {
        Background {
            mode: Mode::Inline {
                dist: dist.clone(),
                done: VecDeque::new(),
            },
        }
    }

    /// Queue `op` on `buf`.
    pub fn submit(&mut self, op: Collective, mut buf: Vec<f32>) -> Result<()> {
        match &mut self.mode {
            Mode::Inline { dist, done } => {
                run(dist, op, &mut buf, false)?;
                done.push_back(buf);
                Ok(())
            }
            Mode::Thread {
                tx: Some(tx),
                waiting,
                ..
            } => {
                tx.send((op, buf)).map_err(|_| ended())?;
                *waiting += 1;
                Ok(())
            }
            Mode::Thread { tx: None, .. } => Err(ended()),
        }
    }

    /// The oldest submitted collective's buffer once it is done (blocks until then).
    pub fn take_next(&mut self) -> Result<Vec<f32>> {
        match &mut self.mode {
            Mode::Inline { done, .. } => done
                .pop_front()
                .ok_or_else(|| Error::msg("no collective is waiting")),
            Mode::Thread { done, waiting, .. } => {
                if *waiting == 0 {
                    return Err(Error::msg("no collective is waiting"));
                }
                let buf = done.recv().map_err(|_| ended())??;
                *waiting -= 1;
                Ok(buf)
            }
        }
    }

    /// Whether the collectives run on a thread of their own.
    pub fn is_background(&self) -> bool {
        matches!(self.mode, Mode::Thread { .. })
    }

    /// Submitted collectives not yet taken back.
    pub fn waiting(&self) -> usize {
        match &self.mode {
            Mode::Inline { done, .. } => done.len(),
            Mode::Thread { waiting, .. } => *waiting,
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let idle = self.waiting() == 0;
        if let Mode::Thread { tx, thread, .. } = &mut self.mode {
            drop(tx.take());
            // Everything was taken back: the thread is idle and ends now. Otherwise the step
            // failed, the caller ends the job, and the thread may be waiting for ranks that
            // will not come: leave it.
            if let Some(t) = thread.take().filter(|_| idle) {
                let _ = t.join();
            }
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
    fn one_rank_gets_its_buffers_back_in_order_either_way() {
        let d = Dist::default();
        for mut q in [Background::start(&d).unwrap(), Background::inline(&d)] {
            q.submit(Collective::Broadcast { root: 0 }, vec![1.0, 2.0])
                .unwrap();
            q.submit(Collective::Reduce { root: 0 }, vec![3.0]).unwrap();
            assert_eq!(q.waiting(), 2);
            assert_eq!(q.take_next().unwrap(), [1.0, 2.0]);
            assert_eq!(q.take_next().unwrap(), [3.0]);
            assert_eq!(q.waiting(), 0);
            assert!(q.take_next().is_err(), "nothing is waiting");
        }
    }

    #[test]
    fn a_bad_root_is_an_error_not_a_hang() {
        let d = Dist::default();
        for mut q in [Background::start(&d).unwrap(), Background::inline(&d)] {
            let r = q
                .submit(Collective::Reduce { root: 3 }, vec![1.0])
                .and_then(|_| q.take_next());
            assert!(r.is_err());
        }
    }
}
