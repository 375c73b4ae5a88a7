"""End-to-end tokens/s of :class:`tkpy.runtime.LLM`: prefill of one long prompt, then decode,
dense against LServe.

- GPU (``gpu`` mark): a Llama-3.1-8B-shaped model with random bf16 weights at 8k-128k context; a
  context whose model, KV pool or activations do not fit is skipped. LServe uses the released
  DuoAttention pattern of Llama-3.1-8B-Instruct (50% streaming heads), ``--head-pattern`` (without
  it those cases fail), and a token budget of 4096.
- CPU: the built-in tiny-random model at short contexts, a few seconds in all, LServe with random
  gates written for it; it checks that the suite runs and says nothing about GPU speed.

Each row is one ``generate`` of ``context`` prompt tokens plus the new tokens, batch 1.
``extra_info`` holds ``prefill_tokens_per_s`` and ``decode_tokens_per_s`` (medians over the timed
rounds), ``metric`` ``"tokens/s"`` with ``tkpy_tokens_per_s`` = decode, and for LServe the dense
run of the same context as ``peer``/``peer_tokens_per_s``/``ratio`` (decode) and ``prefill_ratio``.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import cases
import tkpy
from tkpy.runtime import LLM, LServeConfig, ModelConfig

NEW_TOKENS = {"cpu": 8, "cuda": 64}
ROUNDS = {"cpu": 1, "cuda": 2}
CPU_CONTEXTS = (128, 512)
GPU_CONTEXTS = (8192, 32768, 65536, 131072)


def llama31_8b() -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False,
    }, eos_token_id=[])


def pattern_file(folder: Path, layers: int, kv_heads: int, head_pattern: Optional[Path]) -> str:
    """Llama-3.1-8B's released pattern (32 x 8), ``--head-pattern``, which must be given; random gates
    for the tiny model."""
    if (layers, kv_heads) == (32, 8):
        return str(cases.require_head_pattern(head_pattern))
    path = folder / f"gates_{layers}x{kv_heads}.tsv"
    gates = np.random.default_rng(0).uniform(size=(layers, kv_heads))
    path.write_text("\n".join("\t".join(f"{g:.6f}" for g in row) for row in gates) + "\n")
    return str(path)


def params():
    gpu = [pytest.mark.gpu,
           pytest.mark.skipif(not (torch.cuda.is_available() and tkpy.cuda_compiled()),
                              reason="needs a CUDA device and a tkpy build with CUDA kernels")]
    # Dense before LServe, so that each LServe row finds its dense peer and one model is loaded at a time.
    return [pytest.param(device, mode, context, id=f"{device}-{mode}-ctx{context}", marks=gpu if device == "cuda" else [])
            for device, contexts in (("cpu", CPU_CONTEXTS), ("cuda", GPU_CONTEXTS))
            for mode in ("dense", "lserve") for context in contexts]


class Models:
    """One LLM held at a time (an 8B model and a 128k KV pool fill most of an H100)."""

    def __init__(self, folder: Path, head_pattern: Optional[Path]):
        self.folder, self.head_pattern, self.key, self.llm = folder, head_pattern, None, None

    def get(self, device: str, mode: str) -> LLM:
        if self.key != (device, mode):
            self.llm = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            config = llama31_8b() if device == "cuda" else "tiny-random"
            layers, kv_heads = (32, 8) if device == "cuda" else (4, 2)
            lserve = None if mode == "dense" else LServeConfig(
                static_sparsity=0.5, pattern=pattern_file(self.folder, layers, kv_heads, self.head_pattern),
                token_budget=4096 if device == "cuda" else 256)
            contexts = GPU_CONTEXTS if device == "cuda" else CPU_CONTEXTS
            self.key = None  # until the new model is built: a failed build must not look loaded
            self.llm = LLM(config, device=device, dtype=torch.bfloat16, lserve=lserve, max_batch_size=1,
                           max_seq_len=max(contexts) + NEW_TOKENS[device], progress=False)
            self.key = (device, mode)
        return self.llm


@pytest.fixture(scope="module")
def models(tmp_path_factory, head_pattern):
    return Models(tmp_path_factory.mktemp("runtime_bench"), head_pattern)


@pytest.fixture(scope="module")
def dense_results():
    return {}


@pytest.mark.parametrize(("device", "mode", "context"), params())
def test_runtime_generate(benchmark, models, dense_results, device, mode, context):
    try:
        llm = models.get(device, mode)
        prompt = torch.randint(0, 256, (context,), generator=torch.Generator().manual_seed(context)).tolist()
        rates = []

        def generate():
            llm.generate(prompt, max_new_tokens=NEW_TOKENS[device])
            rates.append((llm.timing.prefill_tokens_per_s, llm.timing.decode_tokens_per_s))

        benchmark.group = f"{device} runtime ctx{context}"
        benchmark.pedantic(generate, rounds=ROUNDS[device], warmup_rounds=1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{mode} at {context} tokens does not fit in GPU memory")
    prefill, decode = (float(np.median(r)) for r in zip(*rates[-ROUNDS[device]:]))  # the warm-up round left out
    info = {"op": "runtime.generate", "case": f"{mode}-ctx{context}", "device": device, "dtype": "bfloat16",
            "shape": "llama-3.1-8b" if device == "cuda" else "tiny-random", "metric": "tokens/s",
            "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "tkpy_tokens_per_s": decode}
    if mode == "dense":
        dense_results[device, context] = (prefill, decode)
    elif (device, context) in dense_results:
        dense_prefill, dense_decode = dense_results[device, context]
        info.update(peer="tkpy dense", peer_tokens_per_s=dense_decode, ratio=decode / dense_decode,
                    prefill_ratio=prefill / dense_prefill)
    benchmark.extra_info.update(info)
