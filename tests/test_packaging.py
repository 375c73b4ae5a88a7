"""What `pip install .` ships: tkpy's C++ headers, and none of the tile library's self-test ops,
which only a TKPY_SELFTEST=1 build (make build, the GPU harness) has.

The wheels are built from an sdist of this checkout, so MANIFEST.in is tested too, and CPU-only
(TKPY_DISABLE_CUDA=1), which compiles in about a minute: the option that adds the self-test
bindings is the same for CUDA builds, and the CUDA kernels it adds are checked in CMake's
configuration, without compiling them."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from test_cpp_api import build_tool
from test_tk_compile import find_nvcc

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY_HEADER = "tkpy/tk_selftest.h"

# Run with PYTHONPATH at an unpacked wheel: where tkpy comes from and what it registers.
INSPECT = """
import json, torch, tkpy
from tkpy.info import selftest_compiled
try:
    library = tkpy.library_dir()
except RuntimeError as exc:
    library = f"error: {exc}"
print(json.dumps({
    "file": tkpy.__file__,
    "selftest_ops": sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("tkpy_selftest::")),
    "selftest_compiled": selftest_compiled(),
    "include_dir": tkpy.include_dir(),
    "library_dir": library,
}))
"""


def build_env(**overrides):
    """This environment without the knobs that change what a build contains, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TKPY_SELFTEST", "TKPY_WATCHDOG_REPORT", "PYTHONPATH")}
    return {**env, **overrides}


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    """An sdist of this checkout, unpacked: the source tree a `pip install` from an index builds."""
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with tarfile.open(out / proc.stdout.strip().splitlines()[-1]) as sdist:
        sdist.extractall(out, filter="data")
    (tree,) = [p for p in out.iterdir() if p.is_dir()]
    return tree


def build_wheel(tree, out, env):
    """pip's wheel of `tree` in `out`, unpacked: (wheel's file names, unpacked folder, inspection)."""
    wheels = out / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(tree)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (wheel,) = wheels.glob("tkpy-*.whl")
    unpacked = out / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(unpacked)
    inspect = subprocess.run([sys.executable, "-c", INSPECT], env=build_env(PYTHONPATH=str(unpacked)), cwd=out,
                             capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0, inspect.stderr[-4000:]
    found = json.loads(inspect.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(unpacked), f"imported {found['file']}, not the wheel's tkpy"
    return names, unpacked, found


@pytest.fixture(scope="module")
def default_wheel(sdist_tree, tmp_path_factory):
    """The wheel `pip install .` builds, without CUDA."""
    return build_wheel(sdist_tree, tmp_path_factory.mktemp("default"), build_env(TKPY_DISABLE_CUDA="1"))


@pytest.fixture(scope="module")
def selftest_wheel(sdist_tree, default_wheel, tmp_path_factory):
    """The same tree rebuilt with TKPY_SELFTEST=1 (after default_wheel: it reconfigures its build folder)."""
    return build_wheel(sdist_tree, tmp_path_factory.mktemp("selftest"),
                       build_env(TKPY_DISABLE_CUDA="1", TKPY_SELFTEST="1"))


def test_default_wheel_has_no_selftest_ops(default_wheel):
    _, _, found = default_wheel
    assert found["selftest_ops"] == []
    assert found["selftest_compiled"] is False


def test_selftest_build_registers_the_selftest_ops(selftest_wheel):
    """The check above can see the ops: the TKPY_SELFTEST=1 build of the same tree has them."""
    _, _, found = selftest_wheel
    assert {"tkpy_selftest::tk_tile_offsets", "tkpy_selftest::tk_wgmma"} <= set(found["selftest_ops"])
    assert found["selftest_compiled"] is True


def test_wheel_carries_the_cpp_headers(default_wheel):
    """Every header of include/ but the self-test launchers', in tkpy/include, which include_dir() names."""
    names, unpacked, found = default_wheel
    headers = {name.removeprefix("tkpy/include/") for name in names if name.startswith("tkpy/include/")}
    expected = {p.relative_to(ROOT / "include").as_posix() for p in (ROOT / "include").rglob("*") if p.is_file()}
    assert headers == expected - {TEST_ONLY_HEADER}
    assert Path(found["include_dir"]) == unpacked / "tkpy" / "include"


def test_cpu_only_wheel_has_no_kernel_library(default_wheel):
    names, _, found = default_wheel
    assert not [name for name in names if name.startswith("tkpy/lib/")]
    assert found["library_dir"].startswith("error: this build of tkpy is CPU-only"), found["library_dir"]


def test_cuda_configuration_leaves_the_selftest_kernels_out_by_default(tmp_path):
    """CMake's default for a CUDA build (setup.py passes the same OFF unless TKPY_SELFTEST=1): the
    product's kernel library, and no self-test source; turning the option on adds them."""
    nvcc = find_nvcc()
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("configuring a CUDA build needs nvcc and a CUDA build of torch")
    configure = [build_tool("cmake"), "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={build_tool('ninja')}", f"-DPython_EXECUTABLE={sys.executable}",
                 "-DTKPY_ENABLE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]

    def build_statements(*options):
        proc = subprocess.run([*configure, *options], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return (tmp_path / "build.ninja").read_text()

    default = build_statements()
    assert "libtkpy_kernels.a" in default
    assert "tk_selftest" not in default
    with_selftest = build_statements("-DTKPY_BUILD_SELFTEST=ON")
    for source in ("csrc/ops/tk_selftest.cpp", "csrc/kernels/tk_selftest/selftest.cu",
                   "csrc/kernels/tk_selftest/warp_mma.cu", "csrc/kernels/tk_selftest/stuck_wait_report.cu"):
        assert source in with_selftest
