"""`python -m tkpy info` and the command-line entry point."""

import subprocess
import sys

import torch

import tkpy
from tkpy.runtime import LLM


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
               "ultravico_attention_forward", "decode_attention", "kv_append_"):
        line = next(l for l in out.splitlines() if l.startswith(op + " "))
        assert line.split()[1:] == ["yes", cuda_column, "yes"], line


def test_generate_with_the_built_in_tiny_model_reports_tokens_per_second():
    proc = run("generate", "--model", "tiny-random", "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("prefill: 6 prompt tokens in ") and "decode: 3 tokens in " in last, last
    assert last.endswith("tokens/s); after warm-up"), last
    # The KV cache as sized: max_batch_size 1 sequence of the default max_seq_len (8192), and the
    # scratch page: 129 pages of 131072 bytes.
    assert "KV cache: 8192 tokens (0.0157 GiB) on cpu, for up to 1 sequences of up to max_seq_len=8192" in proc.stderr


def test_generate_chat_renders_the_template_and_answers_alone():
    proc = run("generate", "--model", "tiny-random", "--system", "Be brief.", "--user", "Hi there",
               "--max-new-tokens", "6", "--dtype", "float16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    llm = LLM("tiny-random", device="cpu", dtype=torch.float16, max_batch_size=1, progress=False)
    expected = llm.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
                        max_new_tokens=6)[0]
    lines = proc.stdout.split("\n")
    assert lines[0] == expected.text and lines[1] == f"  [6 tokens, {expected.finish_reason}]", proc.stdout


def test_lserve_without_a_pattern_says_how_to_get_one():
    proc = run("generate", "--model", "tiny-random", "--prompt", "Hi", "--lserve")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--lserve-pattern is missing" in proc.stderr and "--lserve-streaming-heads none" in proc.stderr
    proc = run("generate", "--model", "tiny-random", "--prompt", "Hi", "--lserve", "--lserve-streaming-heads", "none",
               "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr


def test_unknown_command_prints_usage_and_fails():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "usage: python -m tkpy" in proc.stdout


def test_serve_refuses_a_bad_port_or_model_in_one_error_line():
    for args in (["--port", "70000"], ["--port", "-1"], ["--model", "/nonexistent/folder"]):
        proc = run("serve", "--model", "tiny-random", "--device", "cpu", *args)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
