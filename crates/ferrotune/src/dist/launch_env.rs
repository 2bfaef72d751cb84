//! What the launcher says about this process before any back-end starts: whether it is one of
//! several ranks, and which. Read from the variables each launcher sets: Open MPI's mpirun
//! (`OMPI_COMM_WORLD_*`), PMIx (`PMIX_RANK`, Slurm `srun --mpi=pmix`), PMI (MPICH, Intel MPI),
//! Slurm's srun (`SLURM_PROCID` / `SLURM_STEP_NUM_TASKS` / `SLURM_LOCALID`: the job step's,
//! not `SLURM_NTASKS`, which a batch script's own shell also has) and torchrun (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`).

/// The launch as the environment describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Which launcher's variables were read (`mpirun`, `torchrun`, ...; `none`).
    pub launcher: &'static str,
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    pub local_rank: Option<usize>,
}

/// (launcher, rank, world size, local rank) variables, first match wins.
const SCHEMES: &[(&str, &str, &str, &str)] = &[
    (
        "mpirun",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    (
        "srun",
        "SLURM_PROCID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
    ),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
];

impl LaunchEnv {
    /// From this process's environment.
    pub fn read() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        for &(launcher, rank, world, local) in SCHEMES {
            if let Some(w) = num(world) {
                return LaunchEnv {
                    launcher,
                    rank: num(rank),
                    world_size: Some(w),
                    local_rank: num(local),
                };
            }
        }
        // PMIx gives the rank but the size only through its API.
        if let Some(r) = num("PMIX_RANK") {
            return LaunchEnv {
                launcher: "pmix",
                rank: Some(r),
                world_size: None,
                local_rank: None,
            };
        }
        LaunchEnv {
            launcher: "none",
            rank: None,
            world_size: None,
            local_rank: None,
        }
    }

    /// Whether this process is one of several ranks. A Slurm batch script's own shell (one
    /// task) is not; PMIx without a size counts as several.
    pub fn is_multi_rank(&self) -> bool {
        match self.world_size {
            Some(n) => n > 1,
            None => self.launcher == "pmix",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> LaunchEnv {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn launchers_are_recognised() {
        let e = env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]);
        assert_eq!(
            e,
            LaunchEnv {
                launcher: "mpirun",
                rank: Some(1),
                world_size: Some(2),
                local_rank: Some(1)
            }
        );
        assert!(e.is_multi_rank());
        let e = env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")]);
        assert_eq!(
            (e.launcher, e.rank, e.world_size),
            ("torchrun", Some(3), Some(4))
        );
        // A one-task srun step is a single process; so is the shell of an `sbatch -n 4`
        // script (no job step yet), whatever its allocation.
        let e = env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]);
        assert_eq!(e.launcher, "srun");
        assert!(!e.is_multi_rank());
        let batch_shell = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]);
        assert!(!batch_shell.is_multi_rank());
        let step = env(&[("SLURM_PROCID", "2"), ("SLURM_STEP_NUM_TASKS", "4")]);
        assert_eq!((step.rank, step.world_size), (Some(2), Some(4)));
        assert!(env(&[("PMIX_RANK", "0")]).is_multi_rank());
        let none = env(&[]);
        assert_eq!(none.launcher, "none");
        assert!(!none.is_multi_rank());
        // Garbage is no launch.
        assert!(!env(&[("WORLD_SIZE", "two")]).is_multi_rank());
    }
}
