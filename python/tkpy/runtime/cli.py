"""``python -m tkpy generate``: load a model, continue prompts, report prefill and decode tokens/s."""

from __future__ import annotations

import argparse
import sys

import torch

from ..errors import ArgumentError
from ..lserve import LServeConfig
from .engine import LLM
from .loader import TINY_RANDOM
from .request import check_sampling

# --lserve-X flag -> LServeConfig field; giving any of them turns LServe on.
LSERVE_FLAGS = {
    "sparsity": ("static_sparsity", float, "fraction of (layer, kv head) pairs made streaming"),
    "pattern": ("pattern", str, "DuoAttention full_attention_heads.tsv"),
    "budget": ("token_budget", int, "tokens each retrieval head reads per decode step"),
    "sink": ("sink", int, "decode sink tokens of streaming heads (multiple of 64)"),
    "local": ("local", int, "decode local tokens of streaming heads (multiple of 64)"),
    "prefill-sink": ("prefill_sink", int, "prefill sink tokens of streaming heads"),
    "prefill-local": ("prefill_local", int, "prefill local tokens of streaming heads"),
    "reuse-interval": ("reuse_interval", int, "decode steps a page selection is reused"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Every refusal of the command, argparse's included, is one line starting with "error:".
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tkpy generate", description=__doc__)
    p.add_argument("--model", required=True, help=f"Hugging Face checkpoint folder, or {TINY_RANDOM!r} (built in)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on a GPU")
    p.add_argument("--lserve", action="store_true", help="LServe with its defaults (also implied by any --lserve-*)")
    for flag, (_, kind, what) in LSERVE_FLAGS.items():
        p.add_argument(f"--lserve-{flag}", type=kind, default=None, help=what)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    options = {field: getattr(args, "lserve_" + flag.replace("-", "_")) for flag, (field, _, _) in LSERVE_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        # The checks that need no model first: a wrong flag should not wait for a model to load.
        check_sampling(args.temperature, args.top_p, "generate")
        if "static_sparsity" in options and "pattern" not in options:
            raise ArgumentError("--lserve-sparsity ranks the heads of --lserve-pattern, which is missing")
        lserve = LServeConfig(**options) if args.lserve or options else None
        llm = LLM(args.model, device=args.device, dtype=getattr(torch, args.dtype), lserve=lserve,
                  max_batch_size=len(args.prompt), max_seq_len=args.max_seq_len, cuda_graphs=not args.no_cuda_graphs)
        outputs = llm.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    except (ValueError, TypeError, NotImplementedError, OSError, torch.OutOfMemoryError) as e:
        # A wrong folder, file, flag or size (tkpy.ArgumentError is a ValueError; UnicodeError and
        # OSError's FileNotFoundError are among these): the message says what, and a traceback
        # would bury it.
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outputs):
        print(f"{prompt}{out.text}")
        print(f"  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    t = llm.timing
    print(f"prefill: {t.prefill_tokens} tokens in {t.prefill_seconds:.3f} s ({t.prefill_tokens_per_s:.1f} tokens/s); "
          f"decode: {t.decode_tokens} tokens in {t.decode_seconds:.3f} s ({t.decode_tokens_per_s:.1f} tokens/s)")
    return 0
