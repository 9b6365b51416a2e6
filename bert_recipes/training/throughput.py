"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s (Chowdhery et al. 2022, PaLM, Appendix B), with
model FLOPs per token from :func:`bert_recipes.modeling.training_flops_per_token`. Peaks
are the vendors' dense (no sparsity) 16-bit tensor-core figures. On a CPU, or an unknown
GPU, set ``train.peak_flops`` (``benchmarks/pipeline.py`` measures a CPU's with a large
matmul); without a peak, MFU is not reported.
"""

from __future__ import annotations

import torch

# Dense BF16/FP16 tensor-core peak in FLOP/s, from the vendors' datasheets.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops_per_second(device: torch.device, override: float | None = None) -> float | None:
    """The recipe's ``train.peak_flops`` if set, else the table's figure for a known GPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAK_FLOPS.items():  # ordered: specific names first
        if key in name:
            return value
    return None


def measure_matmul_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best achieved FLOP/s of a ``size x size`` matmul on the CPU (2*size^3 FLOPs each)."""
    import time

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
