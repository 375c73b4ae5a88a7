"""Builds tkpy._C with CMake + Ninja (the CMakeExtension/build_ext pattern of vLLM).

CUDA is compiled when torch is a CUDA build and nvcc is found, unless TKPY_DISABLE_CUDA=1.
cmake and ninja come from this Python's environment (pip's) or else PATH; cmake must be at least the
version of CMakeLists.txt's cmake_minimum_required, which is checked before anything is configured.
Environment knobs: TKPY_DISABLE_CUDA, TKPY_CUDA_ARCHS (default "90a"), TKPY_WATCHDOG_REPORT,
TKPY_SELFTEST, MAX_JOBS, CUDA_HOME.

The package also carries tkpy's C++ API for servers that embed the kernels without torch: the
headers of include/ in tkpy/include and, for CUDA builds, the kernels in tkpy/lib/libtkpy_kernels.a
(tkpy.include_dir(), tkpy.library_dir()).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KERNEL_LIBRARY = "libtkpy_kernels.a"
# include/tkpy/tk_selftest.h declares the self-test launchers, which only a TKPY_SELFTEST build has.
TEST_ONLY_HEADERS = ("tk_selftest.h",)


def env_flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def find_nvcc():
    import torch.utils.cpp_extension as cpp_ext

    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_ext.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def build_tool(name):
    """A tool from this Python's environment (pip's cmake and ninja) before one on PATH; None if neither has it."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def require_build_tool(name, install):
    tool = build_tool(name)
    if tool is None:
        raise RuntimeError(f"tkpy: no {name} was found beside {sys.executable} or on PATH; {install}")
    return tool


def version_tuple(text):
    return tuple(int(part) for part in text.split("."))


def cmake_minimum():
    """CMakeLists.txt's cmake_minimum_required, the one place tkpy's minimum CMake is written."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"^cmake_minimum_required\(VERSION (\d+(?:\.\d+)+)\)", text, re.MULTILINE).group(1)


def find_cmake():
    """The cmake to build with and its version. One older than the minimum is refused here, naming
    itself and the minimum: configuring with it would fail deep in CMake, as Debian 12's 3.25.1 does
    on the CUDA C++20 dialect."""
    minimum = cmake_minimum()
    install = f"pip install 'cmake>={minimum}' into this environment, or put a newer cmake on PATH"
    cmake = require_build_tool("cmake", install)
    try:
        proc = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"tkpy: could not run `{cmake} --version` ({exc}); {install}") from exc
    found = re.search(r"^cmake version (\d+(?:\.\d+)+)", proc.stdout, re.MULTILINE)
    if found is None:
        printed = (proc.stdout + proc.stderr).strip()[:300]
        raise RuntimeError(f"tkpy: `{cmake} --version` printed no CMake version (it printed {printed!r}); {install}")
    version = found.group(1)
    if version_tuple(version) < version_tuple(minimum):
        raise RuntimeError(f"tkpy needs CMake >= {minimum} to build (the first CMake that compiles CUDA C++20 with "
                           f"nvcc); found {cmake} version {version}. {install}")
    return cmake, version


def nvcc_major(nvcc):
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"release (\d+)\.", out).group(1))


def cuda_build_nvcc():
    """The nvcc to build CUDA with, or None for a CPU-only build (and why)."""
    import torch

    if env_flag("TKPY_DISABLE_CUDA"):
        return None, "TKPY_DISABLE_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc was not found (set CUDA_HOME)"
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc_major(nvcc) != torch_major:
        raise RuntimeError(
            f"tkpy: nvcc at {nvcc} is CUDA {nvcc_major(nvcc)} but torch is built for CUDA {torch.version.cuda}; "
            "point CUDA_HOME at a matching toolkit, or set TKPY_DISABLE_CUDA=1 for a CPU-only build"
        )
    return nvcc, None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        cmake, cmake_version = find_cmake()
        ninja = require_build_tool("ninja", "pip install ninja into this environment")
        print(f"tkpy: CMake {cmake_version} at {cmake}, Ninja at {ninja}", flush=True)
        import torch

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        nvcc, why_not = cuda_build_nvcc()
        flavour = "cuda" if nvcc else "cpu"
        # One build folder per (flavour, torch, python): switching any of them never reuses a stale
        # CMake cache, and rebuilding the same one is incremental. The ptxas report lives here.
        # TKPY_WATCHDOG_REPORT=1: every deadlocked mbarrier wait prints where it is stuck before it
        # traps (include/tk/pipeline/watchdog.cuh); printf serialises wgmma, so such a build is for
        # locating a deadlock, never for timing, and gets a build folder of its own.
        report = env_flag("TKPY_WATCHDOG_REPORT") and nvcc is not None
        build_dir = ROOT / "build" / (f"{flavour}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
                                      + ("-watchdog-report" if report else ""))
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DTKPY_ENABLE_CUDA={'ON' if nvcc else 'OFF'}",
            # TKPY_SELFTEST=1 (make build, the GPU harness) adds torch.ops.tkpy_selftest, the tile
            # library's test instruments; `pip install .` leaves them out. Passed on every
            # configure, so switching it reconfigures this folder instead of keeping the last value.
            f"-DTKPY_BUILD_SELFTEST={'ON' if env_flag('TKPY_SELFTEST') else 'OFF'}",
        ]
        if nvcc:
            archs = os.environ.get("TKPY_CUDA_ARCHS", "90a")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DTKPY_CUDA_ARCHS={archs}",
                     f"-DTKPY_WATCHDOG_REPORT={'ON' if report else 'OFF'}"]
            print(f"tkpy: building CUDA kernels for sm_{archs} with {nvcc}", flush=True)
        else:
            print(f"tkpy: CPU-only build ({why_not})", flush=True)

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        start = time.perf_counter()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        print(f"tkpy: build took {time.perf_counter() - start:.1f} s ({jobs} jobs) in {build_dir}", flush=True)
        self.install_cpp_api(extdir, build_dir if nvcc else None)

    def install_cpp_api(self, extdir, kernel_build_dir):
        """Headers into tkpy/include and the kernel library into tkpy/lib of the package being built.
        An editable or in-place build runs from the checkout, whose include/ tkpy.include_dir() finds
        itself; it gets the library in python/tkpy/lib."""
        in_tree = self.editable_mode or self.inplace
        package = ROOT / "python" / "tkpy" if in_tree else extdir
        if not in_tree:
            headers = package / "include"
            shutil.rmtree(headers, ignore_errors=True)
            shutil.copytree(ROOT / "include", headers, ignore=shutil.ignore_patterns(*TEST_ONLY_HEADERS))
        lib = package / "lib"
        shutil.rmtree(lib, ignore_errors=True)
        if kernel_build_dir is not None:
            lib.mkdir(parents=True)
            shutil.copy2(kernel_build_dir / KERNEL_LIBRARY, lib / KERNEL_LIBRARY)


# setuptools runs this file as __main__; tests/test_build_env.py imports it for find_cmake.
if __name__ == "__main__":
    setup(ext_modules=[CMakeExtension("tkpy._C")], cmdclass={"build_ext": CMakeBuild})
