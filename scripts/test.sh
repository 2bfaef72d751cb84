#!/usr/bin/env bash
# The test command (README quickstart, and what CI runs): fetch the real models the tests
# read, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
# The tests (and the processes they start) write their files under the system temp folder: give
# them one folder of their own, removed when everything passed and kept, named, when something
# failed (a run of the whole suite writes about 600 MB there; under /tmp it would pile up).
scratch=$(mktemp -d "${TMPDIR:-/tmp}/ferrotune-test.XXXXXX")
export TMPDIR="$scratch"
trap 'rc=$?; if [ "$rc" = 0 ]; then rm -rf "$scratch"; else echo "test.sh: the tests'"'"' files are kept in $scratch" >&2; fi' EXIT
cargo test --workspace --release "$@"
# Distributed training (issue 15): the `mpi` feature's back-end under `mpirun -np 2`. Open MPI and
# libclang (for the MPI bindings) come from the OS; installed here when missing, if we are root
# with apt. Without them the default build above has already run everything else.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  missing=$(for p in openmpi-bin libopenmpi-dev libclang-dev; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null \
      || echo "test.sh: could not install $missing"
  fi
fi
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  cargo test --release -p ferrotune --features mpi --test integration dist_mpi::
  cargo test --release -p ferrotune-cli --features mpi --test integration distributed_cli::
else
  echo "test.sh: no Open MPI (mpirun, mpicc): the distributed tests were not run"
fi
