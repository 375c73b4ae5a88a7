"""The torch-free C++ API: examples/cpp_server, a program that calls the attention and decode
launchers as a C++ server would, builds against what the package installs (tkpy.include_dir(),
tkpy.library_dir()) and the CUDA runtime alone. Building needs nvcc's toolkit, not a GPU; on a
Hopper GPU the program runs and matches its host reference."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tkpy
from test_tk_compile import find_nvcc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp_server"
PROGRAM = "prefill_and_decode"
LAUNCHERS = ("tkpy::attention::launch_attention_forward", "tkpy::decode::launch_kv_append",
             "tkpy::decode::launch_decode_attention")

pytestmark = pytest.mark.skipif(not tkpy.cuda_compiled(),
                                reason="this build of tkpy is CPU-only: it has no kernel library to link")


def build_tool(name):
    """cmake and ninja from this Python's environment (pip's), as setup.py uses them."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: pip install -r requirements-dev.txt")
    return found


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """The example, configured and built in a fresh folder: (configure, build, binary path)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: building the C++ example needs the CUDA toolkit")
    build = tmp_path_factory.mktemp("cpp_server")
    configure = subprocess.run(
        [build_tool("cmake"), "-S", str(EXAMPLE), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_MAKE_PROGRAM={build_tool('ninja')}", f"-DCUDAToolkit_ROOT={Path(nvcc).parents[1]}",
         f"-DTKPY_INCLUDE_DIR={tkpy.include_dir()}", f"-DTKPY_LIBRARY_DIR={tkpy.library_dir()}"],
        capture_output=True, text=True, timeout=300,
    )
    built = None
    if configure.returncode == 0:
        built = subprocess.run([build_tool("cmake"), "--build", str(build)], capture_output=True, text=True, timeout=600)
    return configure, built, build / PROGRAM


def test_example_builds_against_the_installed_headers_and_library(program):
    configure, built, binary = program
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-2000:]
    assert "warning" not in built.stdout.lower(), built.stdout[-4000:]
    assert binary.is_file()


def test_example_links_the_launchers_and_no_torch(program):
    """The launchers come from libtkpy_kernels.a, and the program needs the CUDA runtime, not torch."""
    _, built, binary = program
    assert built is not None and built.returncode == 0
    dynamic = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert any(name.startswith("libcudart") for name in needed), needed
    assert not [name for name in needed if re.match(r"lib(torch|c10|python)", name)], needed
    symbols = subprocess.run(["nm", "-C", "--defined-only", str(binary)], capture_output=True, text=True,
                             check=True).stdout
    for launcher in LAUNCHERS:
        assert f" {launcher}(" in symbols, f"{launcher} is not defined in {binary}"


def test_library_defines_every_public_launcher():
    """Launchers the example (an inference server) does not call are in the library too: the
    backward's, for a C++ trainer."""
    library = Path(tkpy.library_dir()) / "libtkpy_kernels.a"
    symbols = subprocess.run(["nm", "-C", "--defined-only", str(library)], capture_output=True, text=True,
                             check=True).stdout
    for launcher in (*LAUNCHERS, "tkpy::attention::launch_attention_backward"):
        assert f" {launcher}(" in symbols, f"{launcher} is not defined in {library}"


@pytest.mark.gpu
def test_example_runs_and_matches_its_reference(program):
    _, built, binary = program
    assert built is not None and built.returncode == 0
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^prefill attention: .*: ok$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^kv append: ok$", proc.stdout, re.M), proc.stdout
    # A decode plan cut into several splits: the workspace that workspace_bytes sized is in use.
    decode = re.search(r"^decode attention \((\d+) splits for \d+ SMs\): .*: ok$", proc.stdout, re.M)
    assert decode and int(decode.group(1)) > 1, proc.stdout
