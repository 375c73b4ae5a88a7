"""``LLM``: load a checkpoint, then generate: schedule, run, sample, until every request ends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from ..lserve import LServeConfig
from .attention import AttentionBackend
from .config import ModelConfig
from .loader import (TINY_RANDOM, byte_tokenizer, checkpoint_layout, fill_weights, load_tokenizer, load_weights,
                     random_weights, tiny_random_config)
from .model import Transformer
from .model_runner import ModelRunner
from .paging import Paging
from .request import Generation, Request, StopRule, Timing, sample
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
        Default CUDA when available, else the CPU.
    dtype : torch.bfloat16 or torch.float16, optional
        Weights, activations and KV cache (tkpy's attention kernels take these two). Default bf16.
    lserve : LServeConfig, optional
        LServe sparse attention (streaming heads from a DuoAttention pattern, page selection at
        decode); None is dense attention.
    max_batch_size : int
        Sequences decoded together; more prompts wait for a free place.
    max_seq_len : int, optional
        Prompt plus new tokens of one sequence; sizes the KV pool (``max_batch_size`` sequences of
        this length). Default ``min(max_position_embeddings, 8192)``.
    cuda_graphs : bool
        Capture the decode step in CUDA graphs (one per batch size) on a GPU.
    progress : bool
        Show a progress bar while loading the checkpoint's shards.
    """

    def __init__(self, path: Union[str, PathLike, ModelConfig], device=None, dtype: Optional[torch.dtype] = None,
                 lserve: Optional[LServeConfig] = None, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
                 cuda_graphs: bool = True, progress: bool = True):
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if dtype is None else dtype
        if self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"LLM: dtype must be torch.bfloat16 or torch.float16 (tkpy's attention), got {self.dtype}")
        if max_batch_size < 1:
            raise ValueError(f"LLM: max_batch_size must be >= 1, got {max_batch_size}")
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
        self.config = config
        self.max_seq_len = min(config.max_position_embeddings, 8192) if max_seq_len is None else max_seq_len
        if not 0 < self.max_seq_len <= config.max_position_embeddings:
            raise ValueError(f"LLM: max_seq_len must be in [1, {config.max_position_embeddings}], got {self.max_seq_len}")
        with torch.device("meta"):
            model = Transformer(config, self.max_seq_len).to(self.dtype)
        self.model = model.to_empty(device=self.device).eval().requires_grad_(False)
        if weights is None:
            load_weights(self.model, folder, progress)
        else:
            weights = tqdm(weights, desc="random weights", unit="tensor", total=len(checkpoint_layout(self.model)),
                           disable=not progress)
            fill_weights(self.model, weights, "random weights")
        self.model.rope_tables()

        self.max_batch_size = max_batch_size
        self.paging = Paging(max_batch_size, self.max_seq_len)
        backend = AttentionBackend(config, self.paging.pages.count, self.paging.slots.count, self.dtype, self.device,
                                   lserve)
        self.runner = ModelRunner(self.model, backend, self.paging, max_batch_size, cuda_graphs)
        self.timing = Timing()

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]``: the logits at every position of one prompt (for verification)."""
        request = self._new_request(list(token_ids), 1)
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
        temperature : float
            0 is greedy.
        top_p : float
            Nucleus sampling mass (with temperature > 0).
        stop : str, int, or a list of them, optional
            Stop strings and stop token ids, besides the model's EOS tokens.
        seed : int, optional
            Seed of the sampling generator.

        Returns
        -------
        list of :class:`Generation`, one per prompt, in order. :attr:`timing` holds the tokens/s.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        rule = StopRule(frozenset(self.config.eos_token_ids) | {s for s in stop if isinstance(s, int)},
                        tuple(s for s in stop if isinstance(s, str)), self._decode_text)
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        requests = [self._new_request(self._encode(p), max_new_tokens) for p in prompts]
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

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]

    def _decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _new_request(self, tokens: list[int], max_new_tokens: int) -> Request:
        if not tokens:
            raise ValueError("LLM: a prompt must have at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"LLM: max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"LLM: prompt ({len(tokens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.max_seq_len}")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise ValueError(f"LLM: token ids must be in [0, {self.config.vocab_size})")
        return Request(tokens, len(tokens), max_new_tokens)
