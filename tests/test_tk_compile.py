"""Compile test of the tk tile library: tests/tk_compile/instantiate_all.cu instantiates every
primitive; it must build for sm_90a without warnings or spills, and its SASS must hold every
wgmma shape and the TMA instructions. Needs nvcc, not a GPU."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_sass import tool

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the tile library compile test needs the CUDA toolkit")
    obj = tmp_path_factory.mktemp("tk") / "instantiate_all.o"
    proc = subprocess.run(
        [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'include'}",
         "-Xptxas=--warn-on-spills", "--expt-relaxed-constexpr", "-c", str(ROOT / "tests/tk_compile/instantiate_all.cu"),
         "-o", str(obj)],
        capture_output=True, text=True, timeout=900,
    )
    return proc, obj


def test_every_primitive_compiles_for_sm90a_without_warnings(compiled):
    proc, _ = compiled
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


def test_sass_has_every_wgmma_shape_and_tma(compiled):
    proc, obj = compiled
    assert proc.returncode == 0
    env = dict(os.environ, PATH=f"{Path(tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(obj)], capture_output=True, text=True, env=env, check=True).stdout
    shapes = set(re.findall(r"HGMMA\.64x(\d+)x16\.F32(\.BF16)?\b", sass))
    expected = {(str(n), suffix) for n in range(16, 257, 16) for suffix in ("", ".BF16")}
    assert expected <= shapes, f"missing wgmma shapes: {sorted(expected - shapes)}"
    for instruction in ("UTMALDG", "UTMASTG", "UTMAREDG", "SYNCS", "HMMA.16816.F32.BF16", "HMMA.16816.F32",
                        "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128"):
        assert instruction in sass, f"SASS lacks {instruction}"
    assert not re.search(r"\b(LDL|STL)\b", sass), "the tile library's kernels use local memory"


def test_readme_example_compiles(tmp_path):
    """The example kernel in include/tk/README.md builds as written."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    readme = (ROOT / "include/tk/README.md").read_text()
    example = re.search(r"```cuda\n(.*?)```", readme, re.S).group(1)
    source = tmp_path / "example.cu"
    source.write_text(example)
    proc = subprocess.run(
        [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'include'}",
         "--expt-relaxed-constexpr", "-c", str(source), "-o", str(tmp_path / "example.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
