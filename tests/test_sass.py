"""Static checks of the compiled kernels (DESIGN.md §3), from SASS and ptxas's report; no GPU needed.

Each kernel family declares a pattern for its (demangled) kernel names, the SASS instructions it
must contain and the ones it must not. Every family must match at least one kernel, every kernel
must belong to a family, and ptxas must report 0 spill bytes for every kernel.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import tkpy
from tkpy import _C
from tkpy.info import selftest_compiled

pytestmark = pytest.mark.skipif(not tkpy.cuda_compiled(), reason="this build of tkpy has no CUDA kernels (CPU-only build)")


@dataclass(frozen=True)
class Family:
    name: str
    kernels: str  # regex on the demangled kernel name
    must: tuple[str, ...] = ()  # regexes, each must match some SASS instruction
    must_not: tuple[str, ...] = ()
    selftest: bool = False  # a test instrument, built with TKPY_SELFTEST=1 only


LOCAL_MEMORY = (r"\bLDL\b", r"\bSTL\b")
WARP_SPECIALIZED = ("HGMMA", "UTMALDG", "UTMASTG", "USETMAXREG", "SYNCS")
# tk::wait (include/tk/pipeline/sync.cuh): an mbarrier try-wait, and on its retry path a clock read
# and, past the cycle budget, the watchdog's trap (watchdog.cuh).
MBARRIER_TRY_WAIT = r"SYNCS\.PHASECHK\.TRANS64\.TRYWAIT"
WAIT_WATCHDOG = (r"CS2R R\d+, SR_CLOCKLO", r"BPT\.TRAP")


def attention_kernels(kernel):
    """The demangled names of one attention kernel's layouts, AttnLayout<T, D, consumers,
    (tkpy::attention::Kernel)k, ScoreRule{...}> (include/tkpy/attention.h numbers the kernels)."""
    number = {"baseline": 1, "pipelined": 2}[kernel]
    return rf"tk::pipeline::lcf_kernel<tkpy::attention::AttnLayout<[^<>,]*, \d+, \d+, \(tkpy::attention::Kernel\){number},"


TURN_WAIT = r"BAR\.SYNC\.DEFER_BLOCKING R\d+, 0x100"
TURN_PASS = r"BAR\.ARV R\d+, 0x100"
DEPTH_1_WAIT = r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1"
FAMILIES = [
    # The warp-specialised wgmma GEMM on tk's pipeline template.
    Family("gemm", r"tk::pipeline::lcf_kernel<tkpy::gemm::GemmLayout<", WARP_SPECIALIZED, LOCAL_MEMORY),
    # Dense attention forward on tk's pipeline (task form): a TMA producer and 2 or 3 wgmma
    # consumer warpgroups. Baseline: one wgmma group at a time.
    Family("attention forward, baseline", attention_kernels("baseline"), WARP_SPECIALIZED, LOCAL_MEMORY),
    # Pipelined: the consumers take turns issuing wgmma through named barriers (bar.sync on the
    # warpgroup's own id, bar.arrive on the next one's, 256 threads each), and wait with depth 1
    # (in-warpgroup overlap).
    Family("attention forward, pipelined", attention_kernels("pipelined"),
           (*WARP_SPECIALIZED, TURN_WAIT, TURN_PASS, DEPTH_1_WAIT), LOCAL_MEMORY),
    # Attention backward on tk's pipeline (task form), one layout per (dtype, head dim, BwdRule):
    # TMA loads of K/V (task inputs) and Q/dO, bulk copies of lse and delta, wgmma with A from
    # shared memory (Sᵀ, dPᵀ), from registers (dV, dK) and stored transposed (dQᵀ = Kᵀ dSᵀ), dQ
    # added by fp32 RED (no value back), setmaxnreg, mbarriers; and no local memory.
    Family("attention backward", r"tk::pipeline::lcf_kernel<tkpy::attention::BwdLayout<",
           ("HGMMA", r"HGMMA\.64x\d+x16\.F32(\.BF16)? R\d+, R\d+, gdesc", r"gdesc\[UR\d+\]\.tnspA", "UTMALDG",
            r"UBLKCP\.S\.G", r"REDG\.E\.ADD\.F32\.", "USETMAXREG", "SYNCS"), (*LOCAL_MEMORY, r"ATOMG\.E\.ADD\.F32")),
    # Its preprocessing (lse · log2 e, delta = rowsum(dO ∘ O) - dlse) and dQ conversion kernels.
    Family("attention backward, row statistics", r"tkpy::attention::.*bwd_row_stats_kernel<", ("SHFL.BFLY",),
           LOCAL_MEMORY),
    Family("attention backward, dQ conversion", r"tkpy::attention::.*bwd_dq_kernel<", (), LOCAL_MEMORY),
    # UltraViCo's mean key before the forward: chunk sums (coalesced key rows), then their sum.
    Family("UltraViCo mean key", r"tkpy::attention::.*key_(chunk_sums|mean_from_chunks)", (), LOCAL_MEMORY),
    # Block-sparse lists cut to their ascending prefix, as the forward walks them.
    Family("attention backward, list prefixes", r"tkpy::attention::.*bwd_ascending_counts_kernel", (), LOCAL_MEMORY),
    # The tile library's self-test kernels (tests/test_tk.py).
    Family("tk selftest: TMA", r"tk_selftest::.*tma_roundtrip_kernel<", ("UTMALDG", "UTMASTG", "UTMAREDG", "SYNCS"),
           LOCAL_MEMORY, selftest=True),
    Family("tk selftest: wgmma", r"tk_selftest::.*wgmma_kernel<", ("HGMMA", "UTMALDG", "SYNCS"), LOCAL_MEMORY,
           selftest=True),
    Family("tk selftest: register ops", r"tk_selftest::.*register_ops_kernel", (), LOCAL_MEMORY, selftest=True),
    # UltraViCo's score ops: the decay's min (FMNMX) and row_dot's quad reduction (SHFL.BFLY).
    Family("tk selftest: decay ops", r"tk_selftest::.*decay_ops_kernel", ("FMNMX", "SHFL.BFLY"), LOCAL_MEMORY,
           selftest=True),
    # The online softmax vocabulary: exp2 through the SFU, and the softcap's reciprocal.
    Family("tk selftest: online softmax", r"tk_selftest::.*online_softmax_kernel", ("MUFU.EX2", "MUFU.RCP"),
           LOCAL_MEMORY, selftest=True),
    # A wait nobody arrives at, as the library builds it: the watchdog's trap, and no call (a call
    # into the CUDA runtime would serialise a wgmma kernel's wgmma); and with the report
    # (TK_WAIT_WATCHDOG_REPORT), which prints through the runtime's vprintf.
    Family("tk selftest: stuck wait", r"tk_selftest::.*stuck_wait_kernel<false>", (MBARRIER_TRY_WAIT, *WAIT_WATCHDOG),
           (*LOCAL_MEMORY, r"\bCALL\b"), selftest=True),
    Family("tk selftest: stuck wait, reported", r"tk_selftest::.*stuck_wait_kernel<true>",
           (MBARRIER_TRY_WAIT, *WAIT_WATCHDOG, r"CALL\.ABS"), LOCAL_MEMORY, selftest=True),
    # The decode kernel's warp-scope path on its own: cp.async (zero-filling) into swizzled tiles,
    # ldmatrix and mma.sync m16n8k16; a · bᵀ with plain ldmatrix, a · b through ldmatrix.trans.
    Family("tk selftest: warp mma, a @ b.T", r"tk_selftest::.*warp_mma_kernel<[^<>]*, false>",
           (r"HMMA\.16816\.F32", r"LDSM\.16\.M88\.4", r"LDGSTS\.E\.BYPASS\.128"), LOCAL_MEMORY,
           selftest=True),
    Family("tk selftest: warp mma, a @ b", r"tk_selftest::.*warp_mma_kernel<[^<>]*, true>",
           (r"HMMA\.16816\.F32", r"LDSM\.16\.M88\.4", r"LDSM\.16\.MT88\.4", r"LDGSTS\.E\.BYPASS\.128"),
           LOCAL_MEMORY, selftest=True),
    # The 16-byte path: template args are <T, pairs per access, vectorized=true, ...>.
    Family("rope, 16-byte accesses", r"tkpy::rope::rope_kernel<[^,]+, \d+, true,", ("LDG.E.128", "STG.E.128"), LOCAL_MEMORY),
    # The element-wise path for odd strides and rotary dims.
    Family("rope, element-wise", r"tkpy::rope::rope_kernel<[^,]+, 1, false,", (), LOCAL_MEMORY),
    # Split-KV decode: cp.async 16-byte gathers of K/V pages, ldmatrix (plain and transposed) and
    # mma.sync m16n8k16 for Q Kᵀ and P V, 16-byte output stores.
    Family("decode attention", r"tkpy::decode::.*decode_kernel<",
           ("LDGSTS.E.BYPASS.128", r"HMMA\.16816\.F32", r"LDSM\.16\.M88\.4", r"LDSM\.16\.MT88\.4", r"STG\.E\.128"),
           LOCAL_MEMORY),
    # The lse-weighted merge of the splits' fp32 partials.
    Family("decode split merge", r"tkpy::decode::.*merge_kernel<", (r"LDG\.E\.128",), LOCAL_MEMORY),
    # KV append, 16-byte loads and 16-byte (bf16/fp16) or 8-byte (int8) pool stores.
    Family("kv append, vector accesses", r"tkpy::decode::.*store_kernel<[^<>]*, true>",
           (r"LDG\.E\.128", r"STG\.E\.(128|64)"), LOCAL_MEMORY),
    # KV append, element-wise path for unaligned layouts.
    Family("kv append, element-wise", r"tkpy::decode::.*store_kernel<[^<>]*, false>", (), LOCAL_MEMORY),
    # Min/max key stats of the touched logical pages.
    Family("kv append page stats", r"tkpy::decode::.*stats_kernel<", (), LOCAL_MEMORY),
]


def tool(name):
    """A CUDA binary tool from the nvidia-cuda-* PyPI packages, else from PATH."""
    import nvidia

    for root in nvidia.__path__:
        for found in Path(root).glob(f"*/bin/{name}"):
            return str(found)
    found = shutil.which(name) or shutil.which(name, path=str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin"))
    if found is None:
        pytest.fail(f"{name} not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    return found


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@pytest.fixture(scope="module")
def sass():
    """{demangled kernel name: SASS text} for every kernel in tkpy._C."""
    cuobjdump = tool("cuobjdump")
    env = dict(os.environ, PATH=f"{Path(tool('nvdisasm')).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    dump = subprocess.run([cuobjdump, "-sass", _C.__file__], capture_output=True, text=True, env=env, check=True).stdout
    blocks = re.split(r"^\s*Function : (\S+)\s*$", dump, flags=re.M)
    kernels = dict(zip(blocks[1::2], blocks[2::2]))
    assert kernels, f"cuobjdump found no kernels in {_C.__file__}"
    names = demangle(list(kernels))
    return {names[m]: text for m, text in kernels.items()}


@pytest.fixture(scope="module")
def ptxas_report():
    """ptxas's verbose report of every kernel, written by the build."""
    report = Path(_C.ptxas_report)
    assert report.is_file(), f"ptxas report {report} is missing: rebuild tkpy (pip install --no-build-isolation -e .)"
    return report.read_text()


@pytest.fixture(scope="module")
def ptxas_spills(ptxas_report):
    """{demangled kernel name: (spill store bytes, spill load bytes)} from ptxas's report."""
    found = re.findall(
        r"Function properties for (\S+)\n\s*\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
        ptxas_report,
    )
    names = demangle([m for m, _, _ in found])
    return {names[m]: (int(st), int(ld)) for m, st, ld in found}


def test_sm90a_code_is_present():
    assert "90a" in _C.cuda_archs.split(";")
    listing = subprocess.run([tool("cuobjdump"), "--list-elf", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in listing, listing


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_family_sass(family, sass):
    if family.selftest and not selftest_compiled():
        pytest.skip("the self-test kernels are in TKPY_SELFTEST=1 builds only")
    members = {name: text for name, text in sass.items() if re.search(family.kernels, name)}
    assert members, f"no kernel matches family {family.name!r} ({family.kernels}); was a kernel renamed?"
    for name, text in members.items():
        for pattern in family.must:
            assert re.search(pattern, text), f"{name}: SASS lacks {pattern}"
        for pattern in family.must_not:
            assert not re.search(pattern, text), f"{name}: SASS has {pattern}"


def test_every_kernel_belongs_to_a_family(sass):
    orphans = [name for name in sass if not any(re.search(f.kernels, name) for f in FAMILIES)]
    assert not orphans, f"kernels without declared SASS checks: {orphans}"


def test_every_mbarrier_wait_has_the_watchdog(sass):
    """Every kernel that waits on an mbarrier reads the clock and can trap: tk::wait's watchdog
    (TK_WAIT_WATCHDOG_CYCLES) is compiled in wherever a wait is."""
    waiting = {name: text for name, text in sass.items() if re.search(MBARRIER_TRY_WAIT, text)}
    assert waiting, "no kernel waits on an mbarrier: was the try-wait renamed in SASS?"
    for name, text in waiting.items():
        for pattern in WAIT_WATCHDOG:
            assert re.search(pattern, text), f"{name}: waits on an mbarrier without the watchdog ({pattern})"


def test_no_serialized_wgmma(ptxas_report):
    """ptxas serialises every wgmma of a kernel that calls into the CUDA runtime (printf, assert)
    or otherwise breaks the wgmma pipeline, and says so only in its report ("C75xx Potential
    Performance Loss"). tk::wait's watchdog traps without a call unless TK_WAIT_WATCHDOG_REPORT."""
    serialized = sorted(set(re.findall(r"wgmma\.mma_async instructions are serialized .*", ptxas_report)))
    assert not serialized, serialized


def test_no_spills(sass, ptxas_spills):
    missing = set(sass) - set(ptxas_spills)
    assert not missing, f"kernels missing from the ptxas report: {sorted(missing)[:5]}"
    spilling = {name: s for name, s in ptxas_spills.items() if s != (0, 0)}
    assert not spilling, f"ptxas reports spills (store, load bytes): {spilling}"


@pytest.mark.parametrize("kernel", ["baseline", "pipelined"])
def test_attention_kernels_for_every_head_dim_and_dtype(kernel, sass):
    """Each kernel is compiled for every head dim and dtype (and the pipelined one at D = 64 for
    both its dense 3-consumer and its sparse 2-consumer tiles)."""
    names = [name for name in sass if re.search(attention_kernels(kernel), name)]
    found = {(m.group(1), int(m.group(2)), int(m.group(3)))
             for name in names
             for m in [re.search(r"AttnLayout<(__nv_bfloat16|__half), (\d+), (\d+),", name)]}
    expected = {(t, d, 2) for t in ("__nv_bfloat16", "__half") for d in (64, 128, 256)}
    if kernel == "pipelined":
        expected |= {(t, 64, 3) for t in ("__nv_bfloat16", "__half")}
    assert found == expected, f"{kernel}: compiled (dtype, head_dim, consumers) {sorted(found)}"


def test_ultravico_decay_kernels(sass):
    """UltraViCo's decay (ScoreRule's 4th field): the baseline kernel at every head dim and dtype,
    the pipelined one where the window alone decides at D = 64 and 128. The decay runs under P·V
    (an FMNMX per score a thread holds between the depth-1 and depth-0 waits, beyond the plain
    kernel's), and lengthens that stretch of the plain pipelined kernel of the same shape by at
    most 7 instructions per score (an add, an unsigned compare, FFMA and FMNMX per score, the
    rows' setup, and what ptxas moves across the wait)."""
    rule = r"AttnLayout<(__nv_bfloat16|__half), (\d+), (\d+), \(tkpy::attention::Kernel\)(\d), " \
           r"tkpy::attention::ScoreRule\{(\w+), false, false, (\w+)\}"
    layouts = {}
    for name, text in sass.items():
        m = re.search(rule, name)
        if m and "lcf_kernel" in name:
            layouts[m[1], int(m[2]), int(m[3]), int(m[4]), m[5] == "true", m[6] == "true"] = text
    decaying = {key[:4] for key in layouts if key[5]}
    expected = {(t, d, 2, 1) for t in ("__nv_bfloat16", "__half") for d in (64, 128, 256)}
    expected |= {(t, 64, 3, 2) for t in ("__nv_bfloat16", "__half")} | {(t, 128, 2, 2) for t in ("__nv_bfloat16", "__half")}
    assert decaying == expected, sorted(decaying)
    for dtype, head_dim, consumers, kernel in expected:
        if kernel != 2:
            continue
        plain = work_between_wgmma_waits(layouts[dtype, head_dim, consumers, 2, True, False])[0]
        decay = work_between_wgmma_waits(layouts[dtype, head_dim, consumers, 2, True, True])[0]
        scores = PIPELINED_KV_ROWS[head_dim, consumers, False] // 2
        assert len(decay) - len(plain) <= 7 * scores, (dtype, head_dim, len(decay), len(plain))
        minima = [sum("FMNMX" in i for i in window) for window in (plain, decay)]
        assert minima[1] - minima[0] >= scores, (dtype, head_dim, minima)


def test_attention_backward_for_every_head_dim_dtype_and_rule(sass):
    """The backward is compiled for both dtypes, every head dim, and dense attention with and
    without a softcap and sparse heads (BwdRule{sparse, capped})."""
    found = {(m[1], int(m[2]), m[3], m[4])
             for name in sass
             for m in [re.search(r"BwdLayout<(__nv_bfloat16|__half), (\d+), tkpy::attention::BwdRule\{(\w+), (\w+)\}>",
                                 name)] if m}
    expected = {(t, d, sparse, capped) for t in ("__nv_bfloat16", "__half") for d in (64, 128, 256)
                for sparse, capped in (("false", "false"), ("false", "true"), ("true", "false"))}
    assert found == expected, sorted(found)


def work_between_wgmma_waits(text):
    """For each depth-1 wgmma wait (S is in, P·V still running): the instructions the warpgroup
    runs before the next depth-0 wait, i.e. under P·V."""
    windows = []
    pending = None
    for line in text.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            pending = []
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line and pending is not None:
            windows.append(pending)
            pending = None
        elif pending is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            pending.append(line.split("*/", 1)[1].split(";")[0].strip())
    return windows


# The pipelined kernel's KV block rows by (head dim, consumers, sparse): attn_tile in
# csrc/kernels/attention/attention_fwd.cuh. A thread holds kv_rows / 2 scores of a block.
PIPELINED_KV_ROWS = {(64, 3, False): 64, (64, 2, True): 128, (128, 2, False): 128, (128, 2, True): 128,
                     (256, 2, False): 48, (256, 2, True): 32}


def test_pipelined_attention_overlaps_softmax_with_pv(sass):
    """The in-warpgroup overlap in SASS: after issuing S_j+1 = Q·K_j+1ᵀ and O += P_j·V_j, the
    warpgroup waits for S_j+1 only (depth 1) and runs the softmax of S_j+1 before it waits for P·V.
    ptxas places the depth-0 wait where it expects P·V to be done: without a softcap (with or
    without UltraViCo's decay) at least three quarters of the scores' exp2 (MUFU.EX2, one per score the thread holds; all of them at D = 128
    and 256) have been issued by then; with one (a tanh of two SFU operations per score first) the
    softmax outlasts P·V, and its first exp2 must have been."""
    members = {name: text for name, text in sass.items() if re.search(attention_kernels("pipelined"), name)}
    # 2 dtypes x (3 head dims x (dense, sparse) x softcap + UltraViCo's decay at D = 64 and 128)
    assert len(members) == 28, sorted(members)
    decaying = 0
    for name, text in members.items():
        layout = re.search(r"AttnLayout<[^,]+, (\d+), (\d+), \(tkpy::attention::Kernel\)2, "
                           r"tkpy::attention::ScoreRule\{true, (\w+), (\w+), (\w+)\}", name)
        decaying += layout[5] == "true"
        head_dim, consumers, sparse, capped = int(layout[1]), int(layout[2]), layout[3] == "true", layout[4] == "true"
        scores = PIPELINED_KV_ROWS[head_dim, consumers, sparse] // 2
        windows = work_between_wgmma_waits(text)
        assert len(windows) == 1, f"{name}: expected one depth-1 wait (one loop body), found {len(windows)}"
        exp2 = sum(i.startswith("MUFU.EX2") for i in windows[0])
        needed = 1 if capped else 3 * scores // 4
        assert exp2 >= needed, (f"{name}: {exp2} MUFU.EX2 between the depth-1 and depth-0 wgmma waits, "
                                f"expected at least {needed} ({len(windows[0])} instructions there)")
    assert decaying == 4, "UltraViCo's decay on the pipelined kernel: dense heads, both dtypes, D = 64 and 128"
