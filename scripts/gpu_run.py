#!/usr/bin/env python3
"""The GPU run harness: two commands for a short H200 lease that survive hangs and crashes and bring
back everything needed to fix them (README, "GPU validation").

    python3 scripts/gpu_run.py prep [--python PY]      # here, before the lease: fills .gpu-carry/
    python3 scripts/gpu_run.py check --out $OUT        # command 1: probe, build, GPU tests, sanitizers
    python3 scripts/gpu_run.py bench --out $OUT        # command 2, at once: ceilings and benchmarks
    python3 scripts/gpu_run.py check --dry-run --out D # no GPU: a CPU subset and planted failures

Each command has a global deadline (``--deadline``); a step gets the smaller of its cap and the time
left, and a step with too little time left is skipped and recorded as such. Results are written
under a work folder and packed into ``OUT/run.tgz`` every ~45 s, so a command killed at its limit
still leaves a recent copy; ``OUT`` holds only run.tgz, steps.tsv and summary.md, and the summary is
printed last. The verdict is FAIL when torch sees no GPU or when no GPU test ran.

Tests run under pytest-xdist with ``scripts/pytest_gpu_harness.py`` (per-test timeout, worker
restart after a crash, hang or broken CUDA context, one failure file per failing test); the test
files go in dependency order, the tile library's self-tests first.

Only the standard library is imported here, so the harness reports even when nothing else works.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from harness_files import append_event, failure_header, failure_path, read_events

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"  # git-ignored; the device command names it in `carry`
# The torch-free kernel library an in-place build leaves beside _C (tkpy.library_dir()).
KERNEL_LIBRARY = REPO / "python" / "tkpy" / "lib" / "libtkpy_kernels.a"
SHARED_DATA = REPO.parent / "shared" / "data"

# Test files in dependency order: a broken primitive shows first, in the test that isolates it.
# Files not listed here run after these (tests/test_gpu_run.py checks that the list is current).
TEST_ORDER = [
    "tests/test_tk.py",
    "tests/test_rope.py",
    "tests/test_rope_grad.py",
    "tests/test_gemm.py",
    "tests/test_attention.py",
    "tests/test_block_sparse.py",
    "tests/test_ultravico.py",
    "tests/test_attention_backward.py",
    "tests/test_attention_gradcheck.py",
    "tests/test_kvcache.py",
    "tests/test_decode_ops.py",
    "tests/test_lserve_decode.py",
    "tests/test_no_sync.py",
    "tests/test_cpp_api.py",
    "tests/test_runtime_llm.py",
    "tests/test_runtime_dit.py",
]
# Benchmarks in the order that matters most if time runs out (benchmarks/cases.py orders the ops'
# cases the same way); the runtime's long cases go last.
BENCH_ORDER = ["benchmarks/test_bench_ops.py", "benchmarks/test_bench_runtime.py"]
# The dry run's CPU subset: quick tests of the shared index math and the CPU paths.
DRY_RUN_TESTS = ["tests/test_tk.py", "tests/test_gemm.py"]
DRY_RUN_PLANTED = "scripts/harness_dryrun"
# The bench dry run: CPU GEMM cases around a planted hang, which the step must resume after.
DRY_RUN_BENCH = ["benchmarks/test_bench_ops.py", "scripts/harness_dryrun/bench_planted.py"]
DRY_RUN_BENCH_SELECTION = ["-m", "not gpu", "-k", "gemm or planted"]
# DuoAttention's head pattern of Llama-3.1-8B-Instruct, which the LServe benchmarks take as --head-pattern.
HEAD_PATTERN = Path("duo_attention") / "Meta-Llama-3.1-8B-Instruct.full_attention_heads.tsv"

SOURCES = ("csrc", "include", "cmake", "CMakeLists.txt", "setup.py")
SUMMARY_RESERVE_S = 15  # kept back from the deadline for the summary and the last pack
MIN_STEP_S = 20  # a step with less time than this is skipped, not started
PACK_EVERY_S = 45
MAX_PACKED_FILE = 4 << 20  # larger files (sanitizer logs) are packed as their head and tail


# --------------------------------------------------------------------------------------------
# Here, before the lease
# --------------------------------------------------------------------------------------------


def source_digest(root: Path = REPO) -> str:
    """sha256 over the extension's sources, to tell whether a carried build matches the tree."""
    digest = hashlib.sha256()
    for top in SOURCES:
        path = root / top
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def watchdog_report() -> bool:
    """TKPY_WATCHDOG_REPORT=1: build (and carry) tkpy with deadlocked waits printing their call
    site (setup.py); such a build serialises wgmma and is for locating a deadlock only."""
    return os.environ.get("TKPY_WATCHDOG_REPORT", "0") not in ("", "0")


def extension_stamp() -> str:
    """What a carried build must match: the sources, and whether it reports from its watchdog."""
    return f"{source_digest()} {'watchdog-report' if watchdog_report() else 'default'}"


def extension_path(python: str) -> Path:
    """python/tkpy/_C<EXT_SUFFIX> for the interpreter ``python``."""
    suffix = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return REPO / "python" / "tkpy" / f"_C{suffix}"


def build_vars() -> dict[str, str]:
    """What every build of the harness sets: the tile library's self-test ops (TKPY_SELFTEST=1), which
    the GPU tests run first, and every core unless MAX_JOBS says otherwise."""
    return {"TKPY_SELFTEST": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}


def build_in_place(python: str) -> int:
    """``setup.py build_ext --inplace``; returns its exit code."""
    return subprocess.run([python, "setup.py", "build_ext", "--inplace"], cwd=REPO,
                          env=dict(os.environ, **build_vars())).returncode


def build_dir(python: str) -> Path:
    """The build folder setup.py uses for ``python``'s torch (see setup.py)."""
    code = ("import sys, torch; flavour = 'cuda' if torch.version.cuda else 'cpu'; "
            "print(f'{flavour}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}')")
    name = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return REPO / "build" / (name + ("-watchdog-report" if watchdog_report() else ""))


def prep(args: argparse.Namespace) -> int:
    """Fill .gpu-carry/: the shared data, the commit, and (with --python) a build for the device."""
    if not (SHARED_DATA / "duo_attention").is_dir():
        print(f"prep: {SHARED_DATA / 'duo_attention'} is missing; the LServe benchmarks need it", file=sys.stderr)
        return 1
    shutil.rmtree(CARRY, ignore_errors=True)
    shutil.copytree(SHARED_DATA, CARRY / "shared-data")

    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True).stdout.strip()

    commit = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
              "diff_stat": git("diff", "--stat", "HEAD"), "sources": source_digest()}
    (CARRY / "commit.json").write_text(json.dumps(commit, indent=2) + "\n")
    print(f"prep: shared data and commit {commit['commit'][:12]}{' (dirty)' if commit['dirty'] else ''} in {CARRY}")
    if args.python:
        rc = build_in_place(args.python)
        if rc:
            print(f"prep: the build with {args.python} failed ({rc})", file=sys.stderr)
            return rc
        so = extension_path(args.python)
        (CARRY / "extension").mkdir()
        shutil.copy2(so, CARRY / "extension" / so.name)
        shutil.copy2(KERNEL_LIBRARY, CARRY / "extension" / KERNEL_LIBRARY.name)  # for tests/test_cpp_api.py
        report = build_dir(args.python) / "ptxas_report.txt"
        if report.is_file():
            shutil.copy2(report, CARRY / "extension" / "ptxas_report.txt")
        (CARRY / "extension" / "stamp.txt").write_text(extension_stamp() + "\n")
        print(f"prep: carried extension {so.name} ({so.stat().st_size >> 20} MiB), built from the current sources"
              + (" with the watchdog report on (TKPY_WATCHDOG_REPORT): for locating deadlocks, not for timing"
                 if watchdog_report() else ""))
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"prep: {CARRY} holds {size / 2**20:.1f} MiB; name .gpu-carry in the device command's carry")
    return 0


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------


class Run:
    """One harness command: its work folder, deadline, steps.tsv and the packer."""

    def __init__(self, out: Path, deadline_s: float, mode: str, dry_run: bool):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"tkpy-{mode}-"))
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.mode = mode
        self.dry_run = dry_run
        (self.work / "logs").mkdir()
        self.steps = self.work / "steps.tsv"
        self.steps.write_text("step\tkind\trc\tseconds\tlog\tjunit\tnote\n")
        self.info = {"mode": mode, "dry_run": dry_run, "deadline_s": deadline_s, "gpu_visible": None,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._save_info()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._packer = threading.Thread(target=self._pack_periodically, daemon=True)
        self._packer.start()

    def _save_info(self) -> None:
        (self.work / "run.json").write_text(json.dumps(self.info, indent=2) + "\n")

    def set_info(self, **fields) -> None:
        self.info.update(fields)
        self._save_info()

    def left(self) -> float:
        return self.deadline - time.monotonic() - SUMMARY_RESERVE_S

    def env(self, **extra: str) -> dict[str, str]:
        # TKPY_SELFTEST=1: every build here has the self-test ops, and tests/test_tk.py fails (rather
        # than skips) without them.
        env = dict(os.environ, PYTHONUNBUFFERED="1", TKPY_HARNESS_DIR=str(self.work), TKPY_SELFTEST="1")
        paths = [str(REPO / "python"), str(REPO / "scripts")]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if (CARRY / "shared-data").is_dir():
            env["TKPY_SHARED_DATA"] = str(CARRY / "shared-data")
        env.update(extra)
        return env

    def step(self, name: str, kind: str, cmd: Sequence[str], cap: float, junit: str = "-",
             env: Optional[dict[str, str]] = None) -> Optional[int]:
        """Runs ``cmd`` for at most min(cap, time left), output to logs/NAME.log; returns its exit
        code, 124 when stopped at its limit, or None when skipped for lack of time."""
        budget = min(cap, self.left())
        log = f"logs/{name}.log"
        if budget < MIN_STEP_S:
            self._record(name, kind, "-", 0.0, log, junit, f"skipped: {max(self.left(), 0):.0f} s left")
            print(f"==> [{name}] skipped: {max(self.left(), 0):.0f} s left", flush=True)
            return None
        print(f"==> [{name}] up to {budget:.0f} s: {' '.join(cmd)}", flush=True)
        started = time.monotonic()
        with (self.work / log).open("w") as handle:
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=env or self.env(), stdout=handle,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                note = ""
            except subprocess.TimeoutExpired:
                rc, note = 124, f"stopped at its {budget:.0f} s limit"
                _stop_group(proc)
        seconds = time.monotonic() - started
        self._record(name, kind, str(rc), seconds, log, junit, note)
        print(f"<== [{name}] exit code {rc} in {seconds:.0f} s{'; ' + note if note else ''}", flush=True)
        return rc

    def _record(self, *fields) -> None:
        row = "\t".join(f"{f:.1f}" if isinstance(f, float) else str(f) for f in fields)
        with self._lock, self.steps.open("a") as handle:
            handle.write(row + "\n")
        shutil.copy2(self.steps, self.out / "steps.tsv")

    def _pack_periodically(self) -> None:
        while not self._stop.wait(PACK_EVERY_S):
            self.pack()

    def pack(self) -> None:
        """work/ -> OUT/run.tgz, atomically; files over 4 MiB go in as their head and tail."""
        tmp = self.out / "run.tgz.tmp"
        # The periodic packer and finish() both pack: the rename stays under the lock, or one could
        # move the other's half-written file into place.
        with self._lock:
            with tarfile.open(tmp, "w:gz") as tar:
                for path in sorted(self.work.rglob("*")):
                    if not path.is_file():
                        continue
                    name = f"run/{path.relative_to(self.work)}"
                    try:
                        data = path.read_bytes()
                    except OSError:
                        continue
                    if len(data) > MAX_PACKED_FILE:
                        cut = f"\n\n[... {len(data) - MAX_PACKED_FILE} bytes cut by the harness ...]\n\n".encode()
                        data = data[: MAX_PACKED_FILE // 4] + cut + data[-(MAX_PACKED_FILE * 3 // 4):]
                    member = tarfile.TarInfo(name)
                    member.size, member.mtime = len(data), int(path.stat().st_mtime)
                    tar.addfile(member, io.BytesIO(data))
            os.replace(tmp, self.out / "run.tgz")

    def finish(self) -> int:
        """Summary (printed last), final pack; the exit status is the verdict."""
        self._stop.set()
        import summarize_gpu_run  # beside this script, so on sys.path

        commit_file = CARRY / "commit.json"
        try:
            status = summarize_gpu_run.main(["--out", str(self.work), "--repo", str(REPO)]
                                            + (["--commit-file", str(commit_file)] if commit_file.is_file() else []))
        except Exception:  # the run's files matter more than its summary: pack them all the same
            (self.work / "summary-error.txt").write_text(traceback.format_exc())
            print(traceback.format_exc(), flush=True)
            status = 1
        summary = self.work / "summary.md"
        if summary.is_file():
            shutil.copy2(summary, self.out / "summary.md")
        self.pack()
        print(f"gpu_run {self.mode}: {time.monotonic() - self.start:.0f} s; results in {self.out}/run.tgz "
              f"(work folder {self.work})", flush=True)
        if summary.is_file():
            print(summary.read_text(), flush=True)
        return status


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGINT first (pytest then writes its junit XML), SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def probe(run: Run) -> None:
    """Tools and versions, ~5 s, into logs/probe.log and printed: a broken machine shows at once."""
    code = (
        "import sys, sysconfig, os, torch; print('python', sys.executable, sys.version.split()[0]); "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); "
        "print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); "
        "h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print('Python.h', os.path.exists(h))"
    )
    commands = [["nvidia-smi"], [sys.executable, "-c", code], ["nvcc", "--version"], ["g++", "--version"],
                ["cuobjdump", "--version"], ["compute-sanitizer", "--version"]]
    lines, visible = [], False
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            text = (done.stdout + done.stderr).strip()
        except (OSError, subprocess.SubprocessError) as error:
            text = f"unavailable: {error}"
        lines.append(f"$ {' '.join(cmd[:1] if cmd[0] != sys.executable else ['python3 -c ...'])}\n{text}\n")
        visible = visible or "available True" in text
    (run.work / "logs" / "probe.log").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    run.set_info(gpu_visible=visible, python=sys.executable, machine=platform.node())


def ensure_extension(run: Run) -> bool:
    """A CUDA build of tkpy importable from python/: the carried one when it matches the sources,
    else built here. Keeps the ptxas report and ninja log."""
    carried = next((CARRY / "extension").glob("_C*.so"), None) if (CARRY / "extension").is_dir() else None
    target = extension_path(sys.executable)
    if carried and carried.name == target.name:
        stamp_file = CARRY / "extension" / "stamp.txt"
        if stamp_file.is_file() and stamp_file.read_text().strip() == extension_stamp():
            shutil.copy2(carried, target)
            KERNEL_LIBRARY.parent.mkdir(exist_ok=True)
            shutil.copy2(CARRY / "extension" / KERNEL_LIBRARY.name, KERNEL_LIBRARY)
            if (CARRY / "extension" / "ptxas_report.txt").is_file():
                shutil.copy2(CARRY / "extension" / "ptxas_report.txt", run.work / "ptxas_report.txt")
            print(f"==> carried extension {carried.name} matches the sources", flush=True)
        else:
            print("==> carried extension was built from other sources or another watchdog setting: building",
                  flush=True)
    check = [sys.executable, "-c", "import tkpy, sys; sys.exit(0 if tkpy.cuda_compiled() else 3)"]
    if run.step("import", "build", check, cap=60) == 0:
        return True
    rc = run.step("build", "build", [sys.executable, "setup.py", "build_ext", "--inplace"], cap=300,
                  env=run.env(**build_vars()))
    folder = build_dir(sys.executable)
    for name, keep in (("ptxas_report.txt", "ptxas_report.txt"), (".ninja_log", "ninja_log.txt")):
        if (folder / name).is_file():
            shutil.copy2(folder / name, run.work / keep)
    return rc == 0 and run.step("import-after-build", "build", check, cap=60) == 0


def ordered(files: Sequence[str], first: Sequence[str]) -> list[str]:
    """``first`` (those that exist) then every other file of ``files``, sorted."""
    present = [f for f in first if (REPO / f).is_file()]
    return present + sorted(set(files) - set(present))


def pytest_cmd(run: Run, junit: str, files: Sequence[str], *extra: str, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "pytest_gpu_harness", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={run.work / junit}", "-q", "-rfE", *extra]
    if workers:
        cmd += ["-n", str(workers), "--max-worker-restart", "1000"]
    return cmd


def run_pytest(run: Run, name: str, kind: str, files: Sequence[str], args: Sequence[str], *, cap: float,
               env: dict[str, str], workers: int, wrapper: Sequence[str] = ()) -> None:
    """A pytest step. Under xdist a hang or crash costs one test (the plugin and xdist see to it).
    A single-process run (benchmarks, sanitizers) dies with such a test: it is then recorded as a
    hang or crash, and the step resumes without it and without the tests that finished, while time
    is left. Each attempt is a row of steps.tsv with its own junit XML. ``wrapper`` goes before
    the command (compute-sanitizer)."""
    finished: set[str] = set()
    timeout = float(env.get("TKPY_HARNESS_TIMEOUT", "60"))
    started_at = time.monotonic()
    for attempt in range(1, 100):
        step = name if attempt == 1 else f"{name}-{attempt}"
        seen = len(read_events(run.work))
        deselect = [f"--deselect={test}" for test in sorted(finished)]
        extra = [f"--benchmark-json={run.work / f'bench-raw-{attempt}.json'}"] if kind == "bench" else []
        cmd = [*wrapper, *pytest_cmd(run, f"{step}.xml", files, *args, *extra, *deselect, workers=workers)]
        rc = run.step(step, kind, cmd, cap=cap - (time.monotonic() - started_at), junit=f"{step}.xml", env=env)
        events = read_events(run.work)[seen:]
        started = {e["test"]: e["t"] for e in events if e["event"] == "start"}
        ended = {e["test"] for e in events if e["event"] == "end"}
        finished |= ended
        died = [test for test in started if test not in ended]
        if workers or rc is None or rc == 124 or not died:
            return
        test = died[-1]
        elapsed = time.time() - started[test]
        what = "hang" if elapsed >= 0.9 * timeout else "crash"
        append_event(run.work, what, test=test, worker="main", seconds=round(elapsed, 1))
        headline = (f"HANG: no result after {elapsed:.0f} s (timeout {timeout:.0f} s); stacks in stacks/main.txt"
                    if what == "hang" else f"CRASH: pytest died (exit code {rc}) {elapsed:.1f} s into this test; "
                                           f"see logs/{step}.log and stacks/main.txt")
        failure_path(run.work, test).write_text(failure_header(test, what, "unknown", "main", headline))
        finished.add(test)
        print(f"<== [{step}] {what} in {test}; resuming without it", flush=True)


def compose_bench_json(run: Run) -> None:
    """bench.json in pytest-benchmark's layout from the cases the plugin saved one by one, with the
    machine info of whichever attempt's own JSON got written."""
    cases = run.work / "bench_cases.jsonl"
    if not cases.is_file():
        return
    machine = {}
    for raw in sorted(run.work.glob("bench-raw-*.json")):
        try:
            machine = json.loads(raw.read_text()).get("machine_info", machine)
        except ValueError:
            continue
    entries = [json.loads(line) for line in cases.read_text().splitlines() if line.strip()]
    (run.work / "bench.json").write_text(json.dumps({"machine_info": machine, "benchmarks": entries}, indent=1))


def check(args: argparse.Namespace) -> int:
    run = Run(args.out, args.deadline, "check", args.dry_run)
    probe(run)
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    if args.dry_run:
        env = run.env(TKPY_HARNESS_TIMEOUT=str(args.timeout), TKPY_HARNESS_PLANTED="1")
        run.step("import", "build", [sys.executable, "-c", "import tkpy"], cap=60, env=env)
        files = [*DRY_RUN_TESTS, DRY_RUN_PLANTED]
        run_pytest(run, "tests", "tests", files, ["-m", "not gpu and not slow"], cap=args.tests_cap, env=env,
                   workers=args.workers)
        return run.finish()
    if ensure_extension(run):
        # The workers share the cores for their CPU references; unpinned, each would take them all.
        threads = str(max(1, (os.cpu_count() or 1) // max(args.workers, 1)))
        env = run.env(TKPY_HARNESS_TIMEOUT=str(args.timeout), OMP_NUM_THREADS=threads)
        files = ordered(tests, TEST_ORDER)
        run_pytest(run, "gpu-tests", "tests", files, ["-m", "gpu", *shlex.split(args.pytest_args)], cap=args.tests_cap,
                   env=env, workers=args.workers)
        sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        for tool in ("memcheck", "racecheck"):
            # Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck
            # sees an overrun past a tensor's end instead of a write into a pool neighbour.
            tool_env = run.env(TKPY_HARNESS_TIMEOUT=str(args.sanitizer_cap), PYTORCH_NO_CUDA_MEMORY_CACHING="1")
            wrapper = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--target-processes", "all"]
            run_pytest(run, tool, "sanitizer", files, ["-m", "gpu and sanitizer"], cap=args.sanitizer_cap,
                       env=tool_env, workers=0, wrapper=wrapper)
    return run.finish()


CEILINGS = r"""
import json, sys, torch
def timed(fn, reps):
    for _ in range(3): fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); start.record()
    for _ in range(reps): fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3
g = torch.Generator(device="cuda").manual_seed(0)
src = torch.randn(1 << 30, device="cuda", generator=g, dtype=torch.float32); dst = torch.empty_like(src)
copy_s = timed(lambda: dst.copy_(src), 20)
a, b = (torch.randn(8192, 8192, device="cuda", generator=g).bfloat16() for _ in range(2))
mm_s = timed(lambda: a @ b, 20)
out = {"copy_gbps": 2 * src.numel() * 4 / copy_s / 1e9, "copy_bytes_read_plus_written": 2 * src.numel() * 4,
       "matmul_bf16_8192_tflops": 2 * 8192**3 / mm_s / 1e12}
print(json.dumps(out)); json.dump(out, open(sys.argv[1], "w"), indent=2)
"""


def bench(args: argparse.Namespace) -> int:
    if watchdog_report():
        print("gpu_run bench: TKPY_WATCHDOG_REPORT is set, and a build whose waits report serialises every "
              "wgmma: its timings would not be evidence. Unset it.", file=sys.stderr)
        return 2
    run = Run(args.out, args.deadline, "bench", args.dry_run)
    probe(run)
    if args.dry_run or ensure_extension(run):
        sampler = NvmlSampler(run.work / "nvml.tsv")
        if not args.dry_run:
            run.step("ceilings", "info", [sys.executable, "-c", CEILINGS, str(run.work / "ceilings.json")], cap=60)
        files = DRY_RUN_BENCH if args.dry_run else ordered(
            sorted(str(p.relative_to(REPO)) for p in (REPO / "benchmarks").glob("test_*.py")), BENCH_ORDER)
        selection = DRY_RUN_BENCH_SELECTION if args.dry_run else ["-m", "gpu"]
        pattern = CARRY / "shared-data" / HEAD_PATTERN
        if pattern.is_file():  # without it the LServe cases fail, naming the option
            selection = [*selection, "--head-pattern", str(pattern)]
        env = run.env(TKPY_HARNESS_TIMEOUT=str(args.timeout), **({"TKPY_HARNESS_PLANTED": "1"} if args.dry_run else {}))
        # One process (pytest-benchmark switches itself off under xdist): a case that hangs or
        # crashes ends it, and run_pytest resumes after that case.
        run_pytest(run, "bench-tests", "bench", files, [*selection, *shlex.split(args.pytest_args)], cap=args.tests_cap,
                   env=env, workers=0)
        sampler.stop()
        compose_bench_json(run)
        if (run.work / "bench.json").is_file():
            run.step("attention-plot", "info", [sys.executable, "benchmarks/plot.py",
                                                str(run.work / "bench.json"), "--out", str(run.work / "attention.png"),
                                                "--device", "cpu" if args.dry_run else "cuda"], cap=60)
    return run.finish()


class NvmlSampler:
    """GPU 0's SM clock, memory clock, power and temperature once a second, into a TSV file, for
    reading the benchmarks against throttling. Does nothing without nvidia-ml-py or a GPU."""

    def __init__(self, path: Path):
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML library, no driver or no GPU
            return
        self._nvml = pynvml
        path.write_text("t\tsm_mhz\tmem_mhz\tpower_w\ttemp_c\n")
        self._thread = threading.Thread(target=self._sample, args=(path,), daemon=True)
        self._thread.start()

    def _sample(self, path: Path) -> None:
        nvml, handle, start = self._nvml, self._handle, time.monotonic()
        while not self._stop.wait(1.0):
            try:
                row = (time.monotonic() - start, nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                       nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
                       nvml.nvmlDeviceGetPowerUsage(handle) / 1000, nvml.nvmlDeviceGetTemperature(handle, 0))
            except Exception:
                return
            with path.open("a") as handle_out:
                handle_out.write("\t".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + "\n")

    def stop(self) -> None:
        self._stop.set()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prep", help="here: copy the shared data, record the commit, build for the device")
    p.add_argument("--python", help="an interpreter with the device's Python and torch (scripts/device_rehearsal.sh "
                                    "makes one); its build is carried and used when it matches the sources")
    for name, deadline, cap in (("check", 470, 330), ("bench", 220, 200)):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "gpu-run")),
                       help="where run.tgz, steps.tsv and summary.md go (default: $OUT)")
        p.add_argument("--deadline", type=float, default=deadline, help=f"seconds for the whole command ({deadline})")
        p.add_argument("--tests-cap", type=float, default=cap, help=f"seconds for the test step ({cap})")
        p.add_argument("--timeout", type=float, default=60 if name == "check" else 120,
                       help="seconds per test before it counts as a hang")
        p.add_argument("--dry-run", action="store_true", help="no GPU: a CPU subset and the planted failures")
        p.add_argument("--pytest-args", default="", help="more pytest arguments for the tests or benchmarks, "
                                                          "e.g. \"-k 'not runtime'\"")
        if name == "check":
            p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (8)")
            p.add_argument("--sanitizer-cap", type=float, default=60, help="seconds for each sanitizer step (60)")
    args = parser.parse_args(argv)
    return {"prep": prep, "check": check, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
