"""The accelerator catalog: the one table of accelerator models and their figures in acsp.

The scheduler's engine takes vendor, memory and software stack from it for placement, and
metering's default rate card takes the peak throughput from it for prices, so the two always
agree. Each entry names the source of its figures. Anonymised models of the reference traces
are priced by an assumption that their source states.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """One accelerator model and its published figures."""

    name: str
    """Model name as agents report it, e.g. ``A100-SXM4-80GB``."""
    vendor: str
    """Lower-case vendor: ``nvidia``, ``amd``, ``huawei`` or ``cambricon``."""
    memory_gib: int
    """Device memory in GiB."""
    peak_dense_tflops: Decimal
    """Peak dense throughput at :attr:`reference_precision`, TFLOP/s, without sparsity."""
    reference_precision: str
    """Precision of the peak figure, e.g. ``bf16-tensor``."""
    software_stacks: tuple[str, ...]
    """Stacks jobs build against, e.g. ``cuda-12``; the first is the one placement matches."""
    source: str
    """Source of the figures, or the assumption behind them."""


_CUDA: Final = ("cuda-12",)


def _nvidia(name: str, memory_gib: int, tflops: str, precision: str, source: str) -> ModelFigures:
    return ModelFigures(name, "nvidia", memory_gib, Decimal(tflops), precision, _CUDA, source)


_OPENB_ASSUMPTION: Final = "assumption: anonymised model in the Alibaba openb trace"
_SPOT_ASSUMPTION: Final = "assumption: anonymised model in the Alibaba 2026 spot trace"

MODELS: Final[tuple[ModelFigures, ...]] = (
    _nvidia(
        "T4",
        16,
        "65",
        "fp16-tensor",
        "NVIDIA T4 Tensor Core GPU datasheet: 65 TFLOPS mixed precision (FP16/FP32)",
    ),
    _nvidia(
        "P100",
        16,
        "18.7",
        "fp16",
        "NVIDIA Tesla P100 datasheet, PCIe 16 GB: 18.7 TFLOPS half precision (no tensor cores)",
    ),
    _nvidia(
        "V100M16",
        16,
        "125",
        "fp16-tensor",
        "NVIDIA Tesla V100 datasheet, SXM2: 125 TFLOPS tensor performance",
    ),
    _nvidia(
        "V100M32",
        32,
        "125",
        "fp16-tensor",
        "NVIDIA Tesla V100 datasheet, SXM2 32 GB: 125 TFLOPS tensor performance",
    ),
    _nvidia(
        "A10",
        24,
        "125",
        "bf16-tensor",
        "NVIDIA A10 Tensor Core GPU datasheet: 125 TFLOPS BF16 dense (250 with sparsity)",
    ),
    _nvidia(
        "A100-SXM4-80GB",
        80,
        "312",
        "bf16-tensor",
        "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense (624 with sparsity)",
    ),
    _nvidia(
        "A800-SXM4-80GB",
        80,
        "312",
        "bf16-tensor",
        "NVIDIA A800 datasheet: same tensor throughput as the A100 SXM4 (312 TFLOPS BF16 dense)",
    ),
    _nvidia(
        "H100-SXM5-80GB",
        80,
        "989.5",
        "bf16-tensor",
        "assumption: the H800 SXM5 figure, because the H800 is the H100 SXM5 with a narrower "
        "interconnect",
    ),
    _nvidia(
        "H800",
        80,
        "989.5",
        "bf16-tensor",
        "NVIDIA H800 SXM5 datasheet: 1,979 TFLOPS BF16 with sparsity, halved for dense",
    ),
    # The H200 is the H100's GH100 die with 141 GB of HBM3e. NVML reports 143,771 MiB (about
    # 140.4 GiB) for the 141 GB of an H200 NVL, so 140 GiB is what a min_memory_gib can rely on.
    # NOTE: a deployment that stored version 1 of the rate card before this entry existed keeps
    # that version, so metering prices H200 usage only once a version that includes it is
    # published.
    _nvidia(
        "H200-SXM5-141GB",
        140,
        "989.5",
        "bf16-tensor",
        "NVIDIA H200 SXM, dense figures as tabulated at "
        "https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html: about 989 TFLOPS "
        "FP16/BF16, 1,979 FP8 and 34 FP64; 989.5 is half of 1,979 with sparsity, as for the H800",
    ),
    # openb_node_list_gpu_node.csv puts G2 on 549 nodes of 8 GPUs and 96 CPU cores, the shape
    # of its V100M32 nodes. G3 sits on 39 nodes of 8 GPUs, 128 CPU cores and 768 GiB, more
    # CPU cores than any other 8-GPU node of the trace, so it is taken as a newer part.
    _nvidia("G2", 32, "125", "fp16-tensor", f"{_OPENB_ASSUMPTION}, priced as a V100 SXM2 32 GB"),
    _nvidia("G3", 80, "312", "bf16-tensor", f"{_OPENB_ASSUMPTION}, priced as an A100 SXM4 80 GB"),
    # The spot trace lists two series next to its A100 and H800 fleets.
    _nvidia(
        "GPU-series-1", 80, "312", "bf16-tensor", f"{_SPOT_ASSUMPTION}, priced as an A100 SXM4"
    ),
    _nvidia(
        "GPU-series-2", 80, "312", "bf16-tensor", f"{_SPOT_ASSUMPTION}, priced as an A100 SXM4"
    ),
    ModelFigures(
        "MI300X",
        "amd",
        192,
        Decimal("1307.4"),
        "bf16-tensor",
        ("rocm-6",),
        "AMD Instinct MI300X accelerator data sheet: 1,307.4 TFLOPS FP16/BF16 dense",
    ),
    # NOTE: Huawei publishes no datasheet figure for the 910B itself; 320 TFLOPS FP16 and
    # 64 GB HBM2e are the widely reported figures for the mass-production part.
    ModelFigures(
        "Ascend-910B",
        "huawei",
        64,
        Decimal("320"),
        "fp16-cube",
        ("cann-8",),
        "Huawei Ascend 910B, reported figure: about 320 TFLOPS FP16",
    ),
    ModelFigures(
        "MLU370-X8",
        "cambricon",
        48,
        Decimal("96"),
        "fp16",
        ("neuware-1",),
        "Cambricon MLU370-X8 launch specification: 96 TFLOPS FP16 and BF16, 48 GB LPDDR5",
    ),
)
"""Every model that the engine's catalog and the default rate card contain."""
