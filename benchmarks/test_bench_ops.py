"""tkpy's ops against their peers: one pytest-benchmark entry per case of cases.py.

``cases.measure`` checks each case against ``tkpy.reference`` and times tkpy and each peer once
(CUDA events on the GPU); its record is the entry's ``extra_info``, and pytest-benchmark's own
statistics hold how long that one measurement took. A case whose inputs do not fit in the GPU's
memory is skipped. ``benchmarks/plot.py`` draws the attention entries of ``--benchmark-json``.
"""

import warnings

import pytest
import torch

import cases

CPU = torch.device("cpu")


def test_op(benchmark, record_property, device: torch.device, case: cases.Case) -> None:
    benchmark.group = f"{device.type} {case.op}"
    try:
        record = benchmark.pedantic(cases.measure, args=(case, device), rounds=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{case.op} {case.id}: the inputs do not fit in GPU memory")
    benchmark.extra_info.update(record)
    record_property("record", record)  # for python -m tkpy bench's tables (benchmarks/cli.py)
    # A wrong answer has no speed worth recording.
    assert record["check_passed"], f"relative error {record['rel_err']:.2e} > {record['tolerance']:.0e}"


def test_lserve_case_without_a_head_pattern_is_an_error() -> None:
    lserve = next(case for case in cases.all_cases(CPU, None) if case.op == "token_streaming_attn_func")
    with pytest.raises(ValueError, match="--head-pattern"):
        cases.measure(lserve, CPU)


def test_flex_peer_masks_what_tkpy_computes(head_pattern) -> None:
    """FlexAttention (eager on the CPU) against the reference on every CPU sparse prefill case: a
    wrong mask would time a different workload under the same name."""
    for case in cases.all_cases(CPU, head_pattern):
        if case.op in ("block_sparse_attn_func", "token_streaming_attn_func"):
            run = case.prepare(CPU, torch.Generator().manual_seed(0))
            _, reference = run.check()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                flex = run.peers["flex"]()[-len(reference):]
            assert cases.rel_err(flex, reference) < cases.REL_TOL[case.dtype], case.id


def test_a_backward_case_times_the_backward_alone() -> None:
    """Each call of a ``bwd-`` case, tkpy's and each peer's, runs the attention backward and no
    forward, once its first call (never timed) has run the forward."""
    for case in cases.all_cases(CPU, None):
        if case.op == "flash_attn_func.backward" and case.dims["timed"] == cases.BACKWARD:
            run = case.prepare(CPU, torch.Generator().manual_seed(0))
            for name, call in {"tkpy": run.tkpy, **run.peers}.items():
                call()
                with torch.profiler.profile() as profile:
                    call()
                ops = {event.name for event in profile.events()
                       if "attention" in event.name and event.name.split("::")[0] in ("aten", "tkpy")}
                assert ops and all(op.endswith("_backward") for op in ops), (case.id, name, ops)


def test_a_peer_that_cannot_run_is_recorded_with_its_reason() -> None:
    def refuse() -> None:
        warnings.warn("Flash attention requires head_dim <= 256")
        raise RuntimeError("No available kernel.\nAborting execution.")

    reason = cases.peer_seconds(refuse, CPU)
    assert reason == "Flash attention requires head_dim <= 256; RuntimeError: No available kernel."
