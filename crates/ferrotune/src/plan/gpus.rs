//! Accelerators `plan` knows: dense peak throughput by precision and memory per device.
//!
//! Peaks are the dense (no structured sparsity) tensor-core figures of NVIDIA's datasheets; where
//! a datasheet gives only the 2:4-sparsity figure (marked * there), it is halved here. FP32 is
//! the CUDA-core figure (PyTorch does not use TF32 for matmuls unless asked). Memory is what
//! `nvidia-smi` reports as total (the datasheet's "80GB" is 80 GiB of HBM less what the driver
//! reserves), which is what a training run can allocate from.
use serde::Serialize;

/// Dense peak throughput in TFLOPS (TOPS for int8).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Peaks {
    pub fp32: f64,
    pub tf32: f64,
    pub bf16: f64,
    pub fp16: f64,
    pub int8: f64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Gpu {
    /// The `--gpu` value.
    pub name: &'static str,
    pub label: &'static str,
    /// Bytes a process can allocate (nvidia-smi's total).
    pub memory_bytes: u64,
    pub peak_tflops: Peaks,
}

const MIB: u64 = 1 << 20;

pub const GPUS: &[Gpu] = &[
    // A100 datasheet (SXM4 / PCIe 80GB): FP32 19.5 TF, TF32 156, BF16 312, FP16 312, INT8 624
    // TOPS (the sparsity figures are twice these). nvidia-smi: 81920 MiB.
    Gpu {
        name: "a100",
        label: "A100 80GB",
        memory_bytes: 81920 * MIB,
        peak_tflops: Peaks {
            fp32: 19.5,
            tf32: 156.0,
            bf16: 312.0,
            fp16: 312.0,
            int8: 624.0,
        },
    },
    // Same chip and peaks, 40 GB of HBM2 (nvidia-smi: 40960 MiB).
    Gpu {
        name: "a100-40gb",
        label: "A100 40GB",
        memory_bytes: 40960 * MIB,
        peak_tflops: Peaks {
            fp32: 19.5,
            tf32: 156.0,
            bf16: 312.0,
            fp16: 312.0,
            int8: 624.0,
        },
    },
    // H100 SXM datasheet: FP32 67 TF; TF32 989*, BF16 1,979*, FP16 1,979*, INT8 3,958* TOPS
    // (* with sparsity; dense is half). 80 GB HBM3 (nvidia-smi: 81559 MiB).
    Gpu {
        name: "h100",
        label: "H100 SXM 80GB",
        memory_bytes: 81559 * MIB,
        peak_tflops: Peaks {
            fp32: 67.0,
            tf32: 494.5,
            bf16: 989.5,
            fp16: 989.5,
            int8: 1979.0,
        },
    },
    // H100 PCIe datasheet: FP32 51 TF; TF32 756*, BF16 1,513*, FP16 1,513*, INT8 3,026* TOPS.
    // 80 GB HBM2e (nvidia-smi: 81559 MiB).
    Gpu {
        name: "h100-pcie",
        label: "H100 PCIe 80GB",
        memory_bytes: 81559 * MIB,
        peak_tflops: Peaks {
            fp32: 51.0,
            tf32: 378.0,
            bf16: 756.5,
            fp16: 756.5,
            int8: 1513.0,
        },
    },
    // H200 SXM datasheet: the H100's compute (FP32 67 TF; TF32 989*, BF16 1,979*, FP16 1,979*,
    // INT8 3,958*) with 141 GB HBM3e (nvidia-smi: 143771 MiB).
    Gpu {
        name: "h200",
        label: "H200 SXM 141GB",
        memory_bytes: 143771 * MIB,
        peak_tflops: Peaks {
            fp32: 67.0,
            tf32: 494.5,
            bf16: 989.5,
            fp16: 989.5,
            int8: 1979.0,
        },
    },
    // L4 datasheet: FP32 30.3 TF; TF32 120*, BF16 242*, FP16 242*, INT8 485* TOPS.
    // 24 GB GDDR6 (nvidia-smi: 23034 MiB).
    Gpu {
        name: "l4",
        label: "L4 24GB",
        memory_bytes: 23034 * MIB,
        peak_tflops: Peaks {
            fp32: 30.3,
            tf32: 60.0,
            bf16: 121.0,
            fp16: 121.0,
            int8: 242.5,
        },
    },
];

/// The GPU named by `--gpu` (case-insensitive; `h100-sxm`, `a100-80gb`, `h200-sxm` too).
pub fn find(name: &str) -> Option<&'static Gpu> {
    let n = name.trim().to_ascii_lowercase();
    let n = match n.as_str() {
        "a100-80gb" | "a100-sxm" | "a100-80g" => "a100",
        "a100-40g" => "a100-40gb",
        "h100-sxm" | "h100-80gb" => "h100",
        "h200-sxm" | "h200-141gb" => "h200",
        "l4-24gb" => "l4",
        other => other,
    };
    GPUS.iter().find(|g| g.name == n)
}

pub fn names() -> String {
    GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_names_resolve_and_peaks_are_ordered() {
        assert_eq!(find("H100").unwrap().peak_tflops.bf16, 989.5);
        assert_eq!(find("a100-80gb").unwrap().peak_tflops.bf16, 312.0);
        assert_eq!(find("h200").unwrap().memory_bytes, 143771 << 20);
        assert_eq!(find("l4").unwrap().peak_tflops.bf16, 121.0);
        assert!(find("v100").is_none());
        for g in GPUS {
            let p = g.peak_tflops;
            assert!(
                p.fp32 < p.tf32 && p.tf32 < p.bf16 && p.bf16 < p.int8,
                "{}",
                g.name
            );
            assert_eq!(p.bf16, p.fp16, "{}", g.name);
        }
    }
}
