"""``python -m tkpy generate`` and ``python -m tkpy serve``: load a model, then continue prompts or
answer chats (streaming a single one to stdout), or serve the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..errors import ArgumentError
from ..lserve import LServeConfig
from .engine import LLM
from .loader import TINY_RANDOM
from .request import TextStream, check_sampling

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
# What the CLI reports instead of a traceback: a wrong folder, file, flag or size (tkpy.ArgumentError
# is a ValueError; UnicodeError and OSError's FileNotFoundError are among these).
USER_ERRORS = (ValueError, TypeError, NotImplementedError, OSError, ImportError, torch.OutOfMemoryError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Every refusal of the command, argparse's included, is one line starting with "error:".
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def kv_cache_memory(text: str):
    """``--kv-cache-memory``: bytes (``2147483648``, ``2e9``, or with a GB/GiB/MB/MiB suffix), or a
    share of the free memory (a number in (0, 1])."""
    units = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6}
    lowered = text.strip().lower()
    unit = next((u for u in units if lowered.endswith(u)), None)
    try:
        value = float(lowered[:-len(unit)] if unit else lowered)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or (unit is None and 1 < value != int(value)):
        raise argparse.ArgumentTypeError(f"expected bytes (e.g. 2GiB, 2e9) or a share of the free memory in (0, 1], "
                                         f"got {text!r}")
    if unit is not None:
        return max(1, int(value * units[unit]))
    return value if value < 1 or (value == 1 and "." in lowered) else int(value)


def port(text: str) -> int:
    value = int(text) if text.strip().isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {text!r}")
    return value


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"Hugging Face checkpoint folder, a .gguf file, or {TINY_RANDOM!r} (built in)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--max-seq-len", type=int, default=None, help="prompt plus new tokens of one sequence")
    p.add_argument("--max-batch-size", type=int, default=None, help="sequences decoded together")
    p.add_argument("--kv-cache-memory", type=kv_cache_memory, default=None,
                   help="KV cache bytes (e.g. 2GiB) or share of the free memory (e.g. 0.5); default: sized from "
                        "the model and the device")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on a GPU")
    p.add_argument("--lserve", action="store_true", help="LServe with its defaults (also implied by any --lserve-*)")
    for flag, (_, kind, what) in LSERVE_FLAGS.items():
        p.add_argument(f"--lserve-{flag}", type=kind, default=None, help=what)
    p.add_argument("--lserve-streaming-heads", choices=("pattern", "none"), default=None,
                   help="'pattern': streaming heads from --lserve-pattern (required); 'none': every head "
                        "retrieves, with page selection at decode")


def _lserve(args) -> LServeConfig | None:
    options = {field: getattr(args, "lserve_" + flag.replace("-", "_")) for flag, (field, _, _) in LSERVE_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    if not (args.lserve or options or args.lserve_streaming_heads):
        return None
    if args.lserve_streaming_heads == "none":
        if "pattern" in options or "static_sparsity" in options:
            raise ArgumentError("--lserve-streaming-heads none takes no --lserve-pattern or --lserve-sparsity")
        return LServeConfig(**options)
    if "pattern" not in options:
        raise ArgumentError(
            "LServe's streaming heads come from a DuoAttention pattern, and --lserve-pattern is missing: give "
            "--lserve-pattern FILE (DuoAttention's full_attention_heads.tsv for this model, from the DuoAttention "
            "repository's attn_patterns folder), or --lserve-streaming-heads none for page selection alone")
    return LServeConfig(**options)


def _load(args, max_batch_size: int) -> LLM:
    llm = LLM(args.model, device=args.device, dtype=getattr(torch, args.dtype), lserve=_lserve(args),
              max_batch_size=max_batch_size, max_seq_len=args.max_seq_len, kv_cache_memory=args.kv_cache_memory,
              cuda_graphs=not args.no_cuda_graphs)
    print(f"KV cache: {llm.kv_cache_tokens} tokens ({llm.kv_cache_bytes / 2**30:.3g} GiB) on {llm.device}, for up "
          f"to {llm.max_batch_size} sequences of up to max_seq_len={llm.max_seq_len} tokens", file=sys.stderr)
    return llm


def generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tkpy generate", description="Continue prompts, or answer a chat, with a model.")
    _add_model_flags(p)
    p.add_argument("--prompt", action="append", help="prompt text, continued as is (repeat for a batch)")
    p.add_argument("--user", action="append",
                   help="a user message, answered through the model's chat template (repeat for a batch)")
    p.add_argument("--system", default=None, help="system message of each --user conversation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    return p


def generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    if bool(args.prompt) == bool(args.user):
        generate_parser().error("give --prompt or --user (a chat), one of the two")
    if args.system is not None and not args.user:
        generate_parser().error("--system goes with --user")
    shown = args.prompt or [""] * len(args.user)  # a chat's output is the answer alone
    try:
        # The checks that need no model first: a wrong flag should not wait for a model to load.
        check_sampling(args.temperature, args.top_p, "generate")
        _lserve(args)
        llm = _load(args, len(shown) if args.max_batch_size is None else args.max_batch_size)
        sampling = llm.sampling(args.temperature, args.top_p, args.seed, "generate")
        if args.user:
            system = [] if args.system is None else [{"role": "system", "content": args.system}]
            prompts = [llm.chat_prompt(system + [{"role": "user", "content": u}], f"generate: --user {i}")
                       for i, u in enumerate(args.user)]
        else:
            prompts = [llm.encode(p, f"generate: --prompt {i}") for i, p in enumerate(args.prompt)]
        requests = [llm.make_request(p, args.max_new_tokens, sampling) for p in prompts]
        # One sequence streams to stdout as it is produced; a batch is printed at its end.
        stream = TextStream(requests[0], llm.decode_text) if len(requests) == 1 else None
        if stream is not None:
            print(shown[0], end="", flush=True)
        outputs = llm.run(requests, None if stream is None else lambda _: print(stream.next_piece(), end="", flush=True))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, out in zip(shown, outputs):
        print("" if stream is not None else f"{text}{out.text}")  # a streamed text only needs its line ended
        print(f"  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    print(llm.timing.summary())
    return 0


def serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tkpy serve", description="Serve a model over OpenAI's completions and chat API.")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (0: any free one)")
    return p


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    try:
        _lserve(args)
        from .server import serve as run_server  # starlette and uvicorn: tkpy[serve]

        llm = _load(args, 8 if args.max_batch_size is None else args.max_batch_size)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = TINY_RANDOM if args.model == TINY_RANDOM else Path(args.model).name
    try:
        run_server(llm, host=args.host, port=args.port, model_name=name)
    except SystemExit:  # uvicorn's, after it logged why it could not start (e.g. the port is taken)
        print(f"error: could not serve on {args.host}:{args.port} (uvicorn's message above)", file=sys.stderr)
        return 2
    return 0
