"""Reference bytes for ferrotune's GGML quantizers (`crates/ferrotune/src/quant/ggml_quants.rs`).

Writes `tests/fixtures/gguf_quants/`:
- `input.f32`: ROWS rows of N_PER_ROW little-endian f32 values (seeded normal rows, scaled
  differently, plus a row with an all-zero block, a constant block and a lone outlier);
- `<type>.bin`: those rows quantized by llama.cpp's own ggml (`ggml_quantize_chunk` from the
  libggml-base that llama-cpp-python ships, called through ctypes with no importance matrix, as
  `llama_model_quantize` calls it), for q4_0 q4_1 q5_0 q5_1 q8_0 q4_K q5_K q6_K;
- `bf16.bin`: the rows as BF16, by the `gguf` package (what convert_hf_to_gguf.py writes);
- `meta.json`: rows, n_per_row, the ggml type ids, sizes, and the versions used.

Run: `.venv/bin/python reference/gguf_quant_fixtures.py` (a second, byte-identical run is a check).
"""
import ctypes
import json
import os
import pathlib

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf_quants"
ROWS = 4
N_PER_ROW = 512

# ggml type ids (ggml.h) and bytes per block of (block size) values.
TYPES = {
    "q4_0": (2, 32, 18),
    "q4_1": (3, 32, 20),
    "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24),
    "q8_0": (8, 32, 34),
    "q4_K": (12, 256, 144),
    "q5_K": (13, 256, 176),
    "q6_K": (14, 256, 210),
}


def rows() -> np.ndarray:
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((ROWS, N_PER_ROW)).astype(np.float32)
    x[0] *= 0.02  # weight-like magnitudes
    x[1] = x[1] * 0.5 + 0.1  # shifted: the min/offset types see a non-zero mean
    x[2, :32] = 0.0  # an all-zero block
    x[2, 32:64] = 0.25  # a constant block
    x[2, 300] = 40.0  # a lone outlier
    x[3] = np.abs(x[3]) * 0.01  # all positive (K-quants' min clamps to 0)
    return x


def ggml_lib() -> ctypes.CDLL:
    import llama_cpp

    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    x = np.ascontiguousarray(rows())
    (OUT / "input.f32").write_bytes(x.astype("<f4").tobytes())
    lib = ggml_lib()
    meta = {"rows": ROWS, "n_per_row": N_PER_ROW, "types": {}}
    for name, (tid, block, size) in TYPES.items():
        nbytes = ROWS * N_PER_ROW // block * size
        dst = np.zeros(nbytes, dtype=np.uint8)
        got = lib.ggml_quantize_chunk(
            tid, x.ctypes.data, dst.ctypes.data, 0, ROWS, N_PER_ROW, None
        )
        assert got == nbytes, (name, got, nbytes)
        (OUT / f"{name}.bin").write_bytes(dst.tobytes())
        meta["types"][name] = {"ggml_type": tid, "block": block, "type_size": size, "bytes": nbytes}
    bf16 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    (OUT / "bf16.bin").write_bytes(np.ascontiguousarray(bf16).tobytes())
    import llama_cpp

    meta["llama_cpp_python"] = llama_cpp.__version__
    meta["gguf"] = getattr(gguf, "__version__", "0.19.0")
    # The gguf package's numpy quantizers, where it has them, against ggml's bytes.
    numpy_same = {}
    for name, qt in [
        ("q4_0", gguf.GGMLQuantizationType.Q4_0),
        ("q4_1", gguf.GGMLQuantizationType.Q4_1),
        ("q5_0", gguf.GGMLQuantizationType.Q5_0),
        ("q5_1", gguf.GGMLQuantizationType.Q5_1),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0),
    ]:
        ours = np.ascontiguousarray(gguf.quants.quantize(x, qt)).tobytes()
        numpy_same[name] = ours == (OUT / f"{name}.bin").read_bytes()
    meta["gguf_numpy_equals_ggml"] = numpy_same
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
