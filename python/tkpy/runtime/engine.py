"""``LLM``: load a checkpoint, then generate: schedule, run, sample, until every request ends."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from numbers import Integral
from os import PathLike
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from ..errors import ArgumentError
from ..lserve import LServeConfig
from .attention import AttentionBackend, cache_bytes
from .config import ModelConfig
from .loader import (TINY_RANDOM, byte_tokenizer, checkpoint_layout, checkpoint_shards, fill_weights, load_tokenizer,
                     load_weights, random_weights, tiny_random_config)
from .model import Transformer
from .model_runner import ModelRunner
from .paging import Paging
from .request import Generation, Request, StopRule, Timing, check_sampling, sample
from .resources import check_fits, resolve_device
from .scheduler import Scheduler

__all__ = ["LLM", "Generation", "Timing"]

Prompt = Union[str, Sequence[int]]


class LLM:
    """A Llama-family model served on tkpy's ops.

    Parameters
    ----------
    path : str, PathLike or ModelConfig
        A Hugging Face checkpoint folder (``config.json``, ``*.safetensors``, ``tokenizer.json``) of
        Llama 2/3/3.1, Qwen2/2.5 or Mistral; ``"tiny-random"``, a built-in seeded random model with
        a byte tokenizer (used when no folder of that name exists); or a :class:`ModelConfig`:
        seeded random weights of that shape with the byte tokenizer (for benchmarks).
    device : torch.device or str, optional
        The CPU or a CUDA device that exists. Default CUDA when available, else the CPU.
    dtype : torch.bfloat16 or torch.float16, optional
        Weights, activations and KV cache (tkpy's attention kernels take these two). Default bf16.
    lserve : LServeConfig, optional
        LServe sparse attention (streaming heads from a DuoAttention pattern, page selection at
        decode); None is dense attention.
    max_batch_size : int
        Sequences decoded together; more prompts wait for a free place.
    max_seq_len : int, optional
        Prompt plus new tokens of one sequence; sizes the KV pool (``max_batch_size`` sequences of
        this length). Default ``min(max_position_embeddings, 8192)``. A KV pool that, with the
        weights, needs more than the device's memory is refused before anything is allocated.
    cuda_graphs : bool
        Capture the decode step in CUDA graphs (one per batch size) on a GPU.
    progress : bool
        Show a progress bar while loading the checkpoint's shards.
    """

    def __init__(self, path: Union[str, PathLike, ModelConfig], device=None, dtype: Optional[torch.dtype] = None,
                 lserve: Optional[LServeConfig] = None, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
                 cuda_graphs: bool = True, progress: bool = True):
        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if dtype is None else dtype
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ArgumentError(f"LLM: dtype must be torch.bfloat16 or torch.float16 (tkpy's attention), "
                                f"got {self.dtype}")
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise ArgumentError(f"LLM: max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if max_seq_len is not None and not _is_int(max_seq_len):
            raise ArgumentError(f"LLM: max_seq_len must be an int, got {max_seq_len!r}")
        if lserve is not None and not isinstance(lserve, LServeConfig):
            raise ArgumentError(f"LLM: lserve must be an LServeConfig or None, got {type(lserve).__name__}")
        folder = Path(path) if not isinstance(path, ModelConfig) else None
        if folder is None:
            config, self.tokenizer, weights = path, byte_tokenizer(), random_weights(path, 0, self.device)
        elif str(path) == TINY_RANDOM and not folder.exists():
            config, self.tokenizer = tiny_random_config(), byte_tokenizer()
            weights = random_weights(config, 0, "cpu")
        elif not folder.is_dir():
            raise FileNotFoundError(f"LLM: {path} is not a checkpoint folder (nor {TINY_RANDOM!r})")
        else:
            config, self.tokenizer, weights = ModelConfig.from_folder(folder), load_tokenizer(folder), None
            shards = checkpoint_shards(folder)
        self.config = config
        self.max_seq_len = min(config.max_position_embeddings, 8192) if max_seq_len is None else max_seq_len
        if not 0 < self.max_seq_len <= config.max_position_embeddings:
            raise ArgumentError(f"LLM: max_seq_len must be in [1, {config.max_position_embeddings}], "
                                f"got {self.max_seq_len}")
        self.max_batch_size = max_batch_size
        self.paging = Paging(max_batch_size, self.max_seq_len)
        with torch.device("meta"):
            model = Transformer(config, self.max_seq_len).to(self.dtype)
        # Everything is sized before anything is allocated: a batch or context too large for the
        # device is refused here, not found out by the allocator halfway through.
        kv_bytes = cache_bytes(config, self.paging.pages.count, self.paging.slots.count, self.dtype, lserve)
        rope_bytes = 2 * self.max_seq_len * (config.head_dim // 2) * torch.float32.itemsize  # cos and sin
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rings = "" if lserve is None else f" with LServe rings of sink={lserve.sink} + local={lserve.local} tokens"
        check_fits(self.device, kv_bytes, weight_bytes + rope_bytes,
                   f"max_batch_size={max_batch_size} sequences of max_seq_len={self.max_seq_len} tokens{rings}")
        self.model = model.to_empty(device=self.device).eval().requires_grad_(False)
        if weights is None:
            load_weights(self.model, folder, shards, progress)
        else:
            weights = tqdm(weights, desc="random weights", unit="tensor", total=len(checkpoint_layout(self.model)),
                           disable=not progress)
            fill_weights(self.model, weights, "random weights")
        self.model.rope_tables()

        backend = AttentionBackend(config, self.paging.pages.count, self.paging.slots.count, self.dtype, self.device,
                                   lserve)
        self.runner = ModelRunner(self.model, backend, self.paging, max_batch_size, cuda_graphs)
        self.timing = Timing()

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]``: the logits at every position of one prompt (for verification)."""
        request = self._new_request(self._encode(token_ids, 0), 1)
        self.paging.reserve(request)
        try:
            return self.model.logits(self.runner.prefill_hidden([request]))
        finally:
            self.paging.release(request)
            self.runner.batch_changed()

    @torch.inference_mode()
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Union[None, str, int, Sequence[Union[str, int]]] = None,
                 seed: Optional[int] = None) -> list[Generation]:
        """Continue each prompt; sequences of different lengths run batched.

        Parameters
        ----------
        prompts : str, list of token ids, or a list of either
        max_new_tokens : int
            At least 1; with the longest prompt at most ``max_seq_len``.
        temperature : float
            Finite and >= 0; 0 is greedy.
        top_p : float
            Nucleus sampling mass in (0, 1] (with temperature > 0).
        stop : str, int, or a list of them, optional
            Stop strings (non-empty) and stop token ids, besides the model's EOS tokens.
        seed : int, optional
            Seed of the sampling generator, in [0, 2**64).

        Returns
        -------
        list of :class:`Generation`, one per prompt, in order. :attr:`timing` holds the tokens/s.

        Raises
        ------
        tkpy.ArgumentError
            For any argument above out of its range, before anything runs.
        """
        check_sampling(temperature, top_p, "LLM.generate")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise ArgumentError(f"LLM.generate: seed must be an int in [0, 2**64) or None, got {seed!r}")
        if not isinstance(prompts, Iterable):
            raise ArgumentError(f"LLM.generate: prompts must be a str, a list of token ids or a list of either, "
                                f"got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and _is_int(prompts[0]):
            prompts = [prompts]
        single = stop is None or isinstance(stop, (str, Integral)) or not isinstance(stop, Iterable)
        stop = [] if stop is None else [stop] if single else list(stop)
        if not all((isinstance(s, str) and s) or (_is_int(s) and s >= 0) for s in stop):
            raise ArgumentError(f"LLM.generate: stop must hold non-empty strings and token ids >= 0, got {stop!r}")
        rule = StopRule(frozenset(self.config.eos_token_ids) | {int(s) for s in stop if _is_int(s)},
                        tuple(s for s in stop if isinstance(s, str)), self._decode_text)
        requests = [self._new_request(self._encode(p, i), max_new_tokens) for i, p in enumerate(prompts)]
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        scheduler = Scheduler(self.paging, self.max_batch_size, rule)
        for request in requests:
            scheduler.add(request)
        self.timing = Timing()
        try:
            while not scheduler.done:
                self._step(scheduler, temperature, top_p, generator)
        finally:
            for request in requests:  # after an error, give back what unfinished requests hold
                if request.pages:
                    self.paging.release(request)
        return [Generation(r.generated, self._decode_text(r.generated) if r.text is None else r.text, r.finish_reason)
                for r in requests]

    def _step(self, scheduler: Scheduler, temperature: float, top_p: float,
              generator: Optional[torch.Generator]) -> None:
        """Prefill the requests just admitted, if any, else decode one token of every running one."""
        requests, is_prefill = scheduler.schedule()
        start = time.perf_counter()
        logits = self.runner.prefill(requests) if is_prefill else self.runner.decode(requests)
        next_tokens = sample(logits, temperature, top_p, generator).tolist()  # the host sync of the step
        elapsed = time.perf_counter() - start
        if is_prefill:
            self.timing.prefill_tokens += sum(r.prompt_len for r in requests)
            self.timing.prefill_seconds += elapsed
        else:
            self.timing.decode_tokens += len(requests)
            self.timing.decode_seconds += elapsed
        if scheduler.postprocess(requests, next_tokens):
            self.runner.batch_changed()

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from undecodable bytes in argv
                raise ArgumentError(f"LLM.generate: prompt {i} is not valid text: {e.reason} at character "
                                    f"{e.start}") from None
            return self.tokenizer.encode(prompt).ids
        tokens = list(prompt) if isinstance(prompt, Iterable) else None
        if tokens is None or not all(_is_int(t) for t in tokens):
            raise ArgumentError(f"LLM.generate: prompt {i} must be a str or a list of token ids (ints), "
                                f"got {type(prompt).__name__}")
        return [int(t) for t in tokens]

    def _decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _new_request(self, tokens: list[int], max_new_tokens: int) -> Request:
        if not tokens:
            raise ArgumentError("LLM: a prompt must have at least one token")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ArgumentError(f"LLM: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise ArgumentError(f"LLM: prompt ({len(tokens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                f"max_seq_len={self.max_seq_len}")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise ArgumentError(f"LLM: token ids must be in [0, {self.config.vocab_size})")
        return Request(tokens, len(tokens), max_new_tokens)


def _is_int(value) -> bool:
    # numpy and torch integers included; bool excluded (True is an int to Python, never a count).
    return isinstance(value, Integral) and not isinstance(value, bool)
