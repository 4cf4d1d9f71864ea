"""What a device can run: CPU instruction-set facts, ONNX Runtime's providers, memory, and the formats they allow.

An agent reports these at registration (`DeviceProfile.capabilities`), and the
same facts of the measuring machine go into `fedge bench edge` and the edge
section of results.json, so an accuracy or latency figure always says which
CPU it came from. Free of torch.

CPU facts come from numpy's runtime CPUID detection (`__cpu_features__`): it
reads the CPU itself, so under an emulator (qemu-user) it sees the emulated
CPU, where /proc/cpuinfo shows the host's.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort
import psutil

#: The instruction-set facts worth reporting (numpy's names), x86 then ARM.
X86_FLAGS = ("SSE41", "AVX", "AVX2", "FMA3", "F16C", "AVX512F", "AVX512BW", "AVX512VNNI", "AVXVNNI", "AVX512BF16",
             "AVX512FP16")
ARM_FLAGS = ("NEON", "ASIMD", "ASIMDHP", "ASIMDDP", "ASIMDFHM", "SVE")

#: How ONNX Runtime's CPU kernels multiply-accumulate int8, by instruction set. Only "pmaddubsw" adds pairs of
#: products into int16 (and saturates there with full-range int8 weights; fedge's 7-bit weights never do).
INT8_KERNELS = {
    "vnni": "x86 VNNI: int8 dot products accumulate in int32 (exact)",
    "pmaddubsw": "x86 without VNNI: u8 x s8 pairs summed in int16 (saturates with full-range weights, exact with 7-bit)",
    "sdot": "ARM dot product (SDOT/UDOT): accumulates in int32 (exact)",
    "neon": "ARM NEON widening multiplies: accumulate in int32 (exact)",
    "none": "no SIMD int8 kernel known for this CPU",
}

#: Model precisions from smallest to largest; a device takes the first one its checks accept.
PRECISIONS = ("int8", "fp16", "fp32")
GPU_RUNTIMES = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda")


def cpu_features() -> dict[str, bool]:
    """numpy's runtime CPU feature detection (every feature numpy knows, True where this CPU has it)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__  # type: ignore[no-redef]
    return {str(k): bool(v) for k, v in __cpu_features__.items()}


def isa_facts(features: dict[str, bool] | None = None) -> tuple[str, ...]:
    """The reported instruction-set extensions this CPU has, in `X86_FLAGS + ARM_FLAGS` order."""
    features = cpu_features() if features is None else features
    return tuple(flag for flag in (*X86_FLAGS, *ARM_FLAGS) if features.get(flag))


def int8_kernel(isa: tuple[str, ...] | list[str]) -> str:
    """Which of `INT8_KERNELS` ONNX Runtime uses for int8 Conv/MatMul on a CPU with these extensions."""
    flags = set(isa)
    if flags & {"AVX512VNNI", "AVXVNNI"}:
        return "vnni"
    if flags & {"AVX2", "AVX512BW", "AVX", "SSE41"}:
        return "pmaddubsw"
    if "ASIMDDP" in flags:
        return "sdot"
    if flags & {"ASIMD", "NEON"}:
        return "neon"
    return "none"


def _cpu_name() -> str:
    """The CPU's marketing name where the OS says (a label only: under emulation it names the host's CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclass(frozen=True)
class Capabilities:
    """One device's facts; field names match `fedge.v1.Capabilities`."""

    machine: str                      # platform.machine(): x86_64, aarch64, ...
    cpu: str
    isa: tuple[str, ...]
    int8_kernel: str                  # a key of INT8_KERNELS
    providers: tuple[str, ...]        # ONNX Runtime execution providers present
    memory_bytes: int
    memory_available_bytes: int
    onnxruntime: str
    gpu: str = ""                     # the GPU a TensorRT runtime builds for ("" without one)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def detect(gpu: str = "") -> Capabilities:
    """This machine's capabilities (`gpu`: the GPU's name where the caller knows it)."""
    isa = isa_facts()
    memory = psutil.virtual_memory()
    return Capabilities(machine=platform.machine(), cpu=_cpu_name(), isa=isa, int8_kernel=int8_kernel(isa),
                        providers=tuple(ort.get_available_providers()), memory_bytes=int(memory.total),
                        memory_available_bytes=int(memory.available), onnxruntime=ort.__version__, gpu=gpu)


def preferred_precisions(runtime: str, capabilities: Capabilities) -> tuple[str, ...]:
    """The precisions worth serving on `runtime` here, smallest first (each still has to pass its checks).

    TensorRT builds int8 (from Q/DQ), fp16 and fp32 engines. ONNX Runtime's CUDA provider
    runs Q/DQ int8 through fp32 dequantization, so int8 gains nothing there. ONNX Runtime's
    CPU provider has int8 kernels on every x86-64 and ARM SIMD CPU (with 7-bit weights, exact
    on all of them); an fp16 format costs half of fp32's download and, its weight casts
    folded when the session loads, runs at fp32's speed (measured: docs/edge.md), so it is
    the fallback before fp32.
    """
    if runtime == "onnxruntime-cuda":
        return ("fp16", "fp32")
    if runtime == "onnxruntime-cpu" and capabilities.int8_kernel == "none":
        return ("fp16", "fp32")
    return PRECISIONS


def describe(capabilities: Capabilities | Mapping[str, Any]) -> str:
    """One line for tables and logs: machine, the int8-relevant extensions, and the int8 kernel
    (of a Capabilities or its `as_dict()`, as results.json keeps it)."""
    facts = capabilities.as_dict() if isinstance(capabilities, Capabilities) else capabilities
    shown = [f for f in facts["isa"] if f in ("AVX2", "AVX512F", "AVX512VNNI", "AVXVNNI", "ASIMD", "ASIMDDP", "ASIMDHP")]
    return f"{facts['machine']} {' '.join(shown) or '-'}; int8 kernel {facts['int8_kernel']}"
