#!/usr/bin/env bash
# Build ferrotune with the `cuda` and `nccl` features using the CUDA toolkit and NCCL from PyPI
# (no system CUDA).
#   scripts/build-cuda.sh [compute capability, default 90]
# Downloads nvcc, nvvm, the runtime, cccl, cuBLAS, cuRAND, NVRTC and NCCL wheels into
# .cache/cuda, then runs `cargo build --release --features nccl` (which includes `cuda`) with
# CUDARC_CUDA_VERSION / CUDA_COMPUTE_CAP set. FEATURES=cuda builds without NCCL. Linking also
# needs libcuda.so, which comes with the NVIDIA driver of a GPU machine. The binary finds
# libnccl.so.2 through LD_LIBRARY_PATH: `source .cache/cuda/env.sh` before running it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${FERROTUNE_CACHE:-$root/.cache}/cuda"
PY="${PYTHON:-python3}"
mkdir -p "$cache/wheels"
"$PY" -m pip download --no-deps -d "$cache/wheels" nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-runtime \
  nvidia-cuda-cccl nvidia-cuda-crt nvidia-cublas nvidia-curand nvidia-cuda-nvrtc nvidia-nccl-cu13
for w in "$cache"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$cache"; done
cu="$(ls -d "$cache"/nvidia/cu1* | head -1)"
chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true
# the linker wants unversioned names
nccl="$cache/nvidia/nccl"
for so in "$cu"/lib/lib*.so.* "$nccl"/lib/lib*.so.*; do ln -sf "$(basename "$so")" "${so%%.so.*}.so"; done
export CUDA_ROOT="$cu" CUDA_PATH="$cu" PATH="$cu/bin:$PATH" LIBRARY_PATH="$cu/lib:$nccl/lib:${LIBRARY_PATH:-}"
# What a shell needs to run the binary built here (the NCCL and cuBLAS libraries from PyPI).
printf 'export LD_LIBRARY_PATH="%s:%s:${LD_LIBRARY_PATH:-}"\n' "$cu/lib" "$nccl/lib" > "$cache/env.sh"
features="${FEATURES:-nccl}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}" CUDA_COMPUTE_CAP="${1:-90}"
cd "$root"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
  # No NVIDIA driver here (a build machine): compile everything, then link against a stub
  # libcuda.so that defines the driver entry points cudarc references, as the CUDA toolkit's own
  # lib/stubs/libcuda.so does. The binary then runs on the CPU; on a GPU machine the real
  # driver is found at run time instead.
  cargo build --release --features "$features" -p ferrotune
  mkdir -p "$cache/stubs"
  nm "${CARGO_TARGET_DIR:-target}"/release/deps/libcudarc-*.rlib 2>/dev/null | awk '$1 == "U" && $2 ~ /^cu[A-Z]/ {print $2}' \
    | sort -u | awk '{print "void " $1 "(void) {}"}' > "$cache/stubs/libcuda_stub.c"
  cc -shared -fPIC -o "$cache/stubs/libcuda.so" "$cache/stubs/libcuda_stub.c"
  export LIBRARY_PATH="$cache/stubs:$LIBRARY_PATH"
fi
cargo build --release --features "$features" -p ferrotune-cli
