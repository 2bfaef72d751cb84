//! `ferrotune-nccl-check`: the collective checks of `ferrotune-dist-check` on the NCCL back-end
//! (one rank per GPU, torchrun-style launch; bench/nccl_check.sh runs it).
#[path = "dist_check.rs"]
mod dist_check;

fn main() {
    dist_check::main()
}
