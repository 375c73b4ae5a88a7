"""The environment a result must be read against: versions, the device, NVML's clocks and power."""

from __future__ import annotations

import platform
from typing import Any, Callable, Optional, Union

import torch

from .. import __version__, cuda_compiled


def nvml_gpu_info(uuid: Optional[str] = None, index: int = 0) -> dict[str, Any]:
    """Name, clocks, power and memory of a GPU from NVML, or ``{}`` when NVML is unavailable.

    Parameters
    ----------
    uuid : str, optional
        The device's UUID (``torch.cuda.get_device_properties(i).uuid``); it identifies the
        device even when ``CUDA_VISIBLE_DEVICES`` renumbers devices.
    index : int
        NVML index, used when ``uuid`` is missing or unknown to NVML.
    """
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = _nvml_handle(pynvml, uuid, index)

        def query(fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> Any:
            # Each query may be unsupported on its own (e.g. power on some boards): skip just that one.
            try:
                value = fn(*args)
            except pynvml.NVMLError:
                return None
            if isinstance(value, bytes):
                return value.decode()
            return value * scale if scale != 1.0 else value

        memory = query(pynvml.nvmlDeviceGetMemoryInfo, handle)
        return {
            "name": query(pynvml.nvmlDeviceGetName, handle),
            "driver": query(pynvml.nvmlSystemGetDriverVersion),
            "memory_total_gib": None if memory is None else memory.total / 2**30,
            "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "power_draw_w": query(pynvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
            "power_limit_w": query(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        }
    except pynvml.NVMLError:  # no handle for the device
        return {}
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml: Any, uuid: Optional[str], index: int) -> Any:
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass  # an unexpected UUID format; the index is right on single-GPU machines
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def environment_info(device: Union[str, torch.device]) -> dict[str, Any]:
    """Versions and the device: what a benchmark result must be read against.

    On CUDA the ``gpu`` entry has torch's device properties, the theoretical HBM bandwidth
    and NVML's clocks and power at the time of the call.
    """
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "tkpy": __version__,
        "tkpy_cuda_kernels": cuda_compiled(),
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mem_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            # Double data rate: two transfers per memory clock.
            "hbm_peak_gbps": 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9 if mem_khz and bus_bits else None,
            **nvml_gpu_info(str(getattr(props, "uuid", "")) or None, device.index or 0),
        }
    else:
        info["cpu"] = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        }
    return info
