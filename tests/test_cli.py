"""`python -m tkpy info` and the command-line entry point."""

import subprocess
import sys

import tkpy


def run(*args):
    return subprocess.run([sys.executable, "-m", "tkpy", *args], capture_output=True, text=True, timeout=120)


def test_info_lists_versions_build_and_every_op():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"tkpy {tkpy.__version__}" in out
    assert "torch " in out
    assert ("architectures sm_90a" in out) == tkpy.cuda_compiled()
    cuda_column = "yes" if tkpy.cuda_compiled() else "no"
    for op in ("apply_rope_", "apply_rope_3d_", "gemm", "attention_forward", "block_sparse_attention_forward",
               "decode_attention", "kv_append_"):
        line = next(l for l in out.splitlines() if l.startswith(op + " "))
        assert line.split()[1:] == ["yes", cuda_column, "yes"], line


def test_generate_with_the_built_in_tiny_model_reports_tokens_per_second():
    proc = run("generate", "--model", "tiny-random", "--prompt", "Hello", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("prefill: 6 tokens in ") and "decode: 3 tokens in " in last and last.endswith("tokens/s)")


def test_unknown_command_prints_usage_and_fails():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "usage: python -m tkpy" in proc.stdout
