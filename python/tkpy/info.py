"""`python -m tkpy info`: what this build of tkpy contains and what it runs on, and where its C++
API lies for a server that embeds the kernels without torch."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from . import _C

_PACKAGE = Path(__file__).resolve().parent
KERNEL_LIBRARY = "libtkpy_kernels.a"


def include_dir() -> str:
    """The folder to put on a C++ server's include path for ``#include "tkpy/decode.h"`` (and
    ``tkpy/attention.h``, ``tkpy/rope.h``, ``tkpy/gemm.h``, and the tile library ``tk/``).

    An installed package carries the headers in ``tkpy/include``; an editable install uses the
    checkout's ``include/``. Compile with ``-DTKPY_WITH_CUDA`` to declare the launchers.
    """
    for folder in (_PACKAGE / "include", _PACKAGE.parents[1] / "include"):
        if (folder / "tkpy" / "decode.h").is_file():
            return str(folder)
    raise RuntimeError(f"tkpy's C++ headers are missing from {_PACKAGE / 'include'}: reinstall tkpy")


def library_dir() -> str:
    """The folder holding ``libtkpy_kernels.a``, the kernels and their launchers (torch-free; link
    it with the CUDA runtime, ``-ltkpy_kernels -lcudart``). CUDA builds only."""
    lib = _PACKAGE / "lib"
    if (lib / KERNEL_LIBRARY).is_file():
        return str(lib)
    if not _C.cuda_enabled:
        raise RuntimeError("this build of tkpy is CPU-only: it has no CUDA kernels, so no libtkpy_kernels.a")
    raise RuntimeError(f"{KERNEL_LIBRARY} is missing from {lib}: rebuild or reinstall tkpy")


def selftest_compiled() -> bool:
    """Whether this build registers ``torch.ops.tkpy_selftest``, the tile library's test
    instruments: only builds made with ``TKPY_SELFTEST=1`` (``make build``) do."""
    return any(s.name.startswith("tkpy_selftest::") for s in torch._C._jit_get_all_schemas())


def registered_ops() -> list[str]:
    """Names of every ``torch.ops.tkpy`` op, without the namespace."""
    names = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("tkpy::")}
    return sorted(name.split("::", 1)[1] for name in names)


def op_backends(name: str) -> dict[str, bool]:
    """Whether ``tkpy::name`` has a CPU kernel, a CUDA kernel and a fake (Meta) implementation."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {key: has(f"tkpy::{name}", key) for key in ("CPU", "CUDA", "Meta")}


def gpu_lines() -> list[str]:
    """Name, memory and clocks of each GPU through NVML, or why there are none."""
    try:
        import pynvml
    except ImportError:
        return ["nvidia-ml-py is not installed: no GPU details"]
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [f"no NVIDIA GPU visible to NVML ({exc})"]
    try:
        lines = [f"driver {pynvml.nvmlSystemGetDriverVersion()}"]
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            sm_clock = pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
            sm_max = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
            mem_max = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
            lines.append(
                f"GPU {i}: {pynvml.nvmlDeviceGetName(h)}, {mem.total / 2**30:.1f} GiB "
                f"({mem.used / 2**30:.1f} GiB used), SM clock {sm_clock}/{sm_max} MHz, memory clock max {mem_max} MHz"
            )
        return lines
    finally:
        pynvml.nvmlShutdown()


def located(folder_of) -> str:
    """include_dir() or library_dir(), or why there is none."""
    try:
        return folder_of()
    except RuntimeError as exc:
        return f"none ({exc})"


def report() -> str:
    from . import __version__  # here, not at the top: tkpy/__init__.py imports this module first

    cuda_built = bool(_C.cuda_enabled)
    lines = [
        f"tkpy {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "build: " + (f"CUDA {_C.cuda_version}, architectures sm_{', sm_'.join(_C.cuda_archs.split(';'))}" if cuda_built else "CPU only (no CUDA kernels compiled)"),
        "self-test ops (torch.ops.tkpy_selftest): " + ("compiled (a TKPY_SELFTEST=1 build)" if selftest_compiled() else "not compiled"),
        f"C++ headers: {located(include_dir)}",
        f"kernel library: {located(library_dir)}",
        f"torch sees a CUDA device: {torch.cuda.is_available()}",
        "",
    ]
    ops = registered_ops()
    width = max(map(len, ops), default=2) + 2
    lines.append(f"{'op':<{width}}{'CPU':<6}{'CUDA':<6}fake")
    for name in ops:
        b = op_backends(name)
        lines.append(f"{name:<{width}}{'yes' if b['CPU'] else 'no':<6}{'yes' if b['CUDA'] else 'no':<6}{'yes' if b['Meta'] else 'no'}")
    lines += ["", *gpu_lines()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    print(report())
    return 0
