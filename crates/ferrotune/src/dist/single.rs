//! The single-process back-end: one rank, nothing to exchange. The default of every run.
use super::Collectives;
use crate::Result;

/// Rank 0 of 1. [`super::Dist`] never calls its collectives (it answers them itself without a
/// clock or a lock); they are still the identities they should be.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn reduce_sum(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_end_alone_is_the_identity() {
        let s = SingleProcess;
        let mut v = [1.0f32, 2.0];
        s.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
        let mut r = [0.0f32; 2];
        s.reduce_scatter_sum(&v, &mut r).unwrap();
        assert_eq!(r, v);
        let mut g = [0.0f32; 2];
        s.all_gather(&v, &mut g).unwrap();
        assert_eq!(g, v);
        s.broadcast(&mut v, 0).unwrap();
        s.barrier().unwrap();
        assert_eq!((s.rank(), s.world_size(), s.local_rank()), (0, 1, 0));
    }
}
