"""Compile test of the tk tile library: tests/tk_compile/instantiate_all.cu instantiates every
primitive; it must build for sm_90a without warnings or spills, and its SASS must hold every
wgmma shape and the TMA instructions. tests/tk_compile/wait_fast_path.cu shows that tk::wait's
watchdog stays off the fast path. Needs nvcc, not a GPU."""

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


def sass_of(obj):
    env = dict(os.environ, PATH=f"{Path(tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([tool("cuobjdump"), "-sass", str(obj)], capture_output=True, text=True, env=env, check=True).stdout


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
    sass = sass_of(obj)
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


# ---- tk::wait's watchdog (include/tk/pipeline/watchdog.cuh) stays off the fast path -------------

WATCHDOG_BUILDS = {"on": [], "off": ["-DTK_WAIT_WATCHDOG_CYCLES=0"], "report": ["-DTK_WAIT_WATCHDOG_REPORT=1"]}
TRY_WAIT = "SYNCS.PHASECHK.TRANS64.TRYWAIT"
CLOCK_READ = re.compile(r"CS2R R\d+, SR_CLOCKLO")


@pytest.fixture(scope="module")
def watchdog_builds(tmp_path_factory):
    """{build: the instructions of wait_fast_path.cu's kernel, in order} with the watchdog on (the
    default), compiled out and reporting."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("watchdog")
    source = ROOT / "tests/tk_compile/wait_fast_path.cu"
    procs = {
        build: subprocess.Popen(
            [nvcc, "-std=c++20", "-O3", "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'include'}",
             "--expt-relaxed-constexpr", *flags, "-c", str(source), "-o", str(out / f"{build}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for build, flags in WATCHDOG_BUILDS.items()
    }
    for build, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{build}: {log[-4000:]}"
    return {
        build: [ins for ins in re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", sass_of(out / f"{build}.o"), re.M)
                if ins != "NOP"]
        for build in WATCHDOG_BUILDS
    }


def through_first_try_wait(instructions):
    """The kernel's instructions from its entry up to its first mbarrier try-wait and the branch
    after it, branch targets left out (code after the wait moves when the retry path changes)."""
    first = next(i for i, ins in enumerate(instructions) if ins.startswith(TRY_WAIT))
    return [re.sub(r"BRA 0x[0-9a-f]+", "BRA <target>", ins) for ins in instructions[: first + 2]]


def anonymous_registers(instructions):
    return [re.sub(r"\b(U?R)\d+\b", r"\1#", ins) for ins in instructions]


def test_wait_fast_path_is_the_same_with_and_without_the_watchdog(watchdog_builds):
    on = through_first_try_wait(watchdog_builds["on"])
    assert on == through_first_try_wait(watchdog_builds["off"]), "the watchdog changed the fast path"
    # The report's call makes ptxas number registers its own way; the instructions are the same.
    report = through_first_try_wait(watchdog_builds["report"])
    assert anonymous_registers(on) == anonymous_registers(report), "the watchdog's report changed the fast path"


def test_only_the_retry_path_reads_the_clock(watchdog_builds):
    for build in ("on", "report"):
        instructions = watchdog_builds[build]
        fast_path = len(through_first_try_wait(instructions))
        clock_reads = [i for i, ins in enumerate(instructions) if CLOCK_READ.search(ins)]
        assert clock_reads, f"{build}: no clock read: the watchdog is missing"
        assert min(clock_reads) >= fast_path, f"{build}: the clock is read before the first try-wait"
        assert any(ins.startswith("BPT.TRAP") for ins in instructions), f"{build}: the watchdog cannot trap"
    off = watchdog_builds["off"]
    assert not any(CLOCK_READ.search(ins) or ins.startswith("BPT.TRAP") for ins in off), (
        "TK_WAIT_WATCHDOG_CYCLES=0 must compile the watchdog out")
