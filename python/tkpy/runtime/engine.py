"""``LLM``: load a checkpoint, then generate: schedule, run, sample, until every request ends."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral
from os import PathLike
from typing import Optional, Union

import torch

from ..errors import ArgumentError
from ..lserve import LServeConfig
from .attention import AttentionBackend, cache_bytes
from .config import ModelConfig
from .model import Transformer
from .model_runner import ModelRunner
from .loader import open_model
from .paging import PAGE_TOKENS, Paging
from .request import Generation, Request, Sampling, StopRule, Timing, check_sampling, sample_rows
from .resources import check_kv_cache_memory, kv_cache_budget, resolve_device
from .scheduler import Scheduler

__all__ = ["LLM", "Generation", "Timing"]

Prompt = Union[str, Sequence[int]]
# A prefill step packs prompts up to this many tokens (or one prompt of max_seq_len, if longer).
PREFILL_TOKENS = 8192


class LLM:
    """A Llama-family model served on tkpy's ops.

    Parameters
    ----------
    path : str, PathLike or ModelConfig
        A Hugging Face checkpoint folder (``config.json``, ``*.safetensors``, ``tokenizer.json``) of
        Llama 2/3/3.1, Qwen2/2.5 or Mistral; a ``.gguf`` file of one of them (needs ``tkpy[gguf]``;
        quantised weights are dequantised to ``dtype``); ``"tiny-random"``, a built-in seeded random
        model with a byte tokenizer (used when no folder of that name exists); or a
        :class:`ModelConfig`: seeded random weights of that shape with the byte tokenizer.
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
        Prompt plus new tokens of one sequence. Default ``min(max_position_embeddings, 8192)``.
    kv_cache_memory : int or float, optional
        The KV cache's size: bytes (an int), or a share of the memory free on the device once the
        weights and a step's activations have their room (a float in (0, 1]). Default: 0.9 of that
        on a GPU, 0.5 on the CPU. The pool never holds more than ``max_batch_size`` sequences of
        ``max_seq_len`` tokens need, and must hold one; :attr:`kv_cache_tokens` says what it holds.
        Requests wait while the pool has no room for their whole length.
    cuda_graphs : bool
        Capture the decode step in CUDA graphs (one per batch size) on a GPU.
    progress : bool
        Show a progress bar while loading the weights.
    """

    def __init__(self, path: Union[str, PathLike, ModelConfig], device=None, dtype: Optional[torch.dtype] = None,
                 lserve: Optional[LServeConfig] = None, max_batch_size: int = 8, max_seq_len: Optional[int] = None,
                 kv_cache_memory: Union[None, int, float] = None, cuda_graphs: bool = True, progress: bool = True):
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
        check_kv_cache_memory(kv_cache_memory)
        source = open_model(path, self.device)
        config, self.tokenizer, self.chat_template = source.config, source.tokenizer, source.chat_template
        self.config = config
        self.max_seq_len = min(config.max_position_embeddings, 8192) if max_seq_len is None else max_seq_len
        if not 0 < self.max_seq_len <= config.max_position_embeddings:
            raise ArgumentError(f"LLM: max_seq_len must be in [1, {config.max_position_embeddings}], "
                                f"got {self.max_seq_len}")
        self.max_prefill_tokens = max(self.max_seq_len, PREFILL_TOKENS)
        with torch.device("meta"):
            model = Transformer(config, self.max_seq_len).to(self.dtype)
        # Everything is sized before anything is allocated: a cache too large for the device is
        # refused here, not found out by the allocator halfway through.
        self.paging = self._size_kv_cache(model, max_batch_size, kv_cache_memory, lserve)
        self.model = model.to_empty(device=self.device).eval().requires_grad_(False)
        source.fill(self.model, progress)
        self.model.rope_tables()

        backend = AttentionBackend(config, self.paging.pages.count, self.paging.slots.count, self.dtype, self.device,
                                   lserve)
        self.runner = ModelRunner(self.model, backend, self.paging, self.max_batch_size, cuda_graphs)
        self.timing = Timing()
        self.warmup_seconds = self._warm_up()

    def _size_kv_cache(self, model: Transformer, max_batch_size: int, kv_cache_memory, lserve) -> Paging:
        """The page pool that ``kv_cache_memory`` buys, capped at what ``max_batch_size`` sequences
        of ``max_seq_len`` tokens can use; refused when it cannot hold one such sequence."""
        config, pages_per_seq = self.config, math.ceil(self.max_seq_len / PAGE_TOKENS)
        rope_bytes = 2 * self.max_seq_len * (config.head_dim // 2) * torch.float32.itemsize  # cos and sin
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + rope_bytes
        # A step's activations, roughly: a prefill's hidden states, q/k/v and MLP products for
        # max_prefill_tokens tokens, twice over for temporaries, and the logits of a batch.
        width = 4 * config.hidden_size + config.num_heads * config.head_dim * 3 + 3 * config.intermediate_size
        activation_bytes = (2 * self.max_prefill_tokens * width * self.dtype.itemsize
                            + 2 * max_batch_size * config.vocab_size * torch.float32.itemsize)
        budget = kv_cache_budget(self.device, kv_cache_memory, model_bytes, activation_bytes)
        # Fixed: the streaming rings of a batch (LServe), and the scratch page; then bytes per page.
        ring_bytes = cache_bytes(config, 0, max_batch_size + 1, self.dtype, lserve)
        page_bytes = cache_bytes(config, 1, 0, self.dtype, lserve)
        pages = min((budget - ring_bytes) // page_bytes - 1, max_batch_size * pages_per_seq)
        if pages < pages_per_seq:
            rings = "" if lserve is None else (f", after {ring_bytes} bytes of LServe rings for {max_batch_size} "
                                               f"sequences (sink={lserve.sink} + local={lserve.local} tokens)")
            raise ArgumentError(
                f"LLM: a KV cache of {budget} bytes (kv_cache_memory={kv_cache_memory!r} on {self.device}) holds "
                f"{max(pages, 0) * PAGE_TOKENS} tokens{rings}, fewer than one sequence of max_seq_len="
                f"{self.max_seq_len} tokens ({(pages_per_seq + 1) * page_bytes} bytes with the scratch page): lower "
                f"max_seq_len or max_batch_size, or give kv_cache_memory more")
        # A running sequence holds at least one page.
        self.max_batch_size = min(max_batch_size, pages)
        self.kv_cache_tokens = pages * PAGE_TOKENS
        self.kv_cache_bytes = ring_bytes + (pages + 1) * page_bytes
        return Paging(self.max_batch_size, self.max_seq_len, pages)

    @torch.inference_mode()
    def _warm_up(self) -> float:
        """One short prefill and decode step, so that no generate call pays for first-use costs
        (library initialisation, the first CUDA graph). Returns its seconds."""
        start = time.perf_counter()
        prompt_len = max(1, min(16, self.max_seq_len - 1))
        scheduler = self.new_scheduler()
        scheduler.add(Request([0] * prompt_len, prompt_len, min(2, self.max_seq_len - prompt_len) or 1))
        while not scheduler.done:
            self.step(scheduler)
        self.timing = Timing()
        return time.perf_counter() - start

    def new_scheduler(self) -> Scheduler:
        """A scheduler over this model's page pool and batch (one at a time may run)."""
        return Scheduler(self.paging, self.max_batch_size, self.max_prefill_tokens)

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]``: the logits at every position of one prompt (for verification)."""
        request = self.make_request(self.encode(token_ids, "LLM.prefill_logits: token_ids"), 1)
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
            Text is encoded with the tokenizer's special tokens (a BOS where the model adds one).
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
        sampling = self.sampling(temperature, top_p, seed, "LLM.generate")
        if not isinstance(prompts, Iterable):
            raise ArgumentError(f"LLM.generate: prompts must be a str, a list of token ids or a list of either, "
                                f"got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and _is_int(prompts[0]):
            prompts = [prompts]
        requests = [self.make_request(self.encode(p, f"LLM.generate: prompt {i}"), max_new_tokens, sampling, stop)
                    for i, p in enumerate(prompts)]
        return self.run(requests)

    @torch.inference_mode()
    def chat(self, conversations, max_new_tokens: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
             stop: Union[None, str, int, Sequence[Union[str, int]]] = None,
             seed: Optional[int] = None) -> list[Generation]:
        """Answer each conversation: rendered with the model's chat template, the assistant's turn
        opened, then generated as :meth:`generate` does (same arguments; ``max_new_tokens`` None:
        as many as fit in ``max_seq_len``, the model's end-of-turn token ending the answer).

        ``conversations`` is one conversation (a list of ``{"role": ..., "content": ...}``) or a
        list of them; the result is a list with one :class:`Generation` per conversation.
        """
        sampling = self.sampling(temperature, top_p, seed, "LLM.chat")
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)):
            raise ArgumentError(f"LLM.chat: expected a conversation (a list of messages) or a list of them, "
                                f"got {type(conversations).__name__}")
        prompts = [self.chat_prompt(c, f"LLM.chat: conversation {i}") for i, c in enumerate(conversations)]
        requests = [self.make_request(p, max(1, self.max_seq_len - len(p)) if max_new_tokens is None else max_new_tokens,
                                      sampling, stop) for p in prompts]
        return self.run(requests)

    def chat_prompt(self, messages, where: str = "LLM.chat") -> list[int]:
        """The token ids of ``messages`` rendered by the model's chat template, with the assistant's
        turn opened (the template writes any BOS itself)."""
        if self.chat_template is None:
            raise ArgumentError(f"{where}: this model has no chat template (tokenizer_config.json's chat_template, "
                                f"chat_template.jinja, or a GGUF file's tokenizer.chat_template)")
        text = self.chat_template.render(messages, add_generation_prompt=True, where=where)
        return self.tokenizer.encode(_checked_text(text, where), add_special_tokens=False).ids

    def run(self, requests: list[Request],
            on_step: Optional[Callable[[list[Request]], None]] = None) -> list[Generation]:
        """Run requests from :meth:`make_request` to their end, batched; ``on_step`` is called with
        the requests that got a token, after each step. Resets :attr:`timing`."""
        scheduler = self.new_scheduler()
        for request in requests:
            scheduler.add(request)
        self.timing = Timing()
        try:
            while not scheduler.done:
                stepped = self.step(scheduler)
                if on_step is not None:
                    on_step(stepped)
        finally:
            for request in requests:  # after an error, give back what unfinished requests hold
                if request.pages:
                    self.paging.release(request)
        return [Generation(r.generated, self.decode_text(r.generated) if r.text is None else r.text, r.finish_reason)
                for r in requests]

    @torch.inference_mode()
    def step(self, scheduler: Scheduler) -> list[Request]:
        """Prefill the requests just admitted, if any, else decode one token of every running one.
        Returns the requests that got a token (ended ones included, their pages given back)."""
        requests, is_prefill = scheduler.schedule()
        capturing = not is_prefill and self.runner.captures_next(len(requests))
        start = time.perf_counter()
        logits = self.runner.prefill(requests) if is_prefill else self.runner.decode(requests)
        next_tokens = sample_rows(logits, requests).tolist()  # the host sync of the step
        elapsed = time.perf_counter() - start
        if is_prefill:
            self.timing.prefill_tokens += sum(r.prompt_len for r in requests)
            self.timing.prefill_seconds += elapsed
        elif capturing:
            self.timing.capture_steps += 1
            self.timing.capture_seconds += elapsed
        else:
            self.timing.decode_tokens += len(requests)
            self.timing.decode_seconds += elapsed
        if scheduler.postprocess(requests, next_tokens):
            self.runner.batch_changed()
        return requests

    def abort(self, scheduler: Scheduler, request: Request) -> None:
        """Take ``request`` out of ``scheduler`` before its end, giving back its pages."""
        if scheduler.abort(request):
            self.runner.batch_changed()

    def sampling(self, temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
                 where: str = "LLM") -> Sampling:
        """Checked sampling arguments; a seed gets its own generator on the model's device."""
        check_sampling(temperature, top_p, where)
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise ArgumentError(f"{where}: seed must be an int in [0, 2**64) or None, got {seed!r}")
        generator = None if seed is None else torch.Generator(self.device).manual_seed(int(seed))
        return Sampling(float(temperature), float(top_p), generator)

    def encode(self, prompt: Prompt, where: str = "LLM.generate: prompt") -> list[int]:
        """Text (encoded with the tokenizer's special tokens) or token ids -> token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(_checked_text(prompt, where)).ids
        tokens = list(prompt) if isinstance(prompt, Iterable) else None
        if tokens is None or not all(_is_int(t) for t in tokens):
            raise ArgumentError(f"{where} must be a str or a list of token ids (ints), got {type(prompt).__name__}")
        return [int(t) for t in tokens]

    def decode_text(self, token_ids: list[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def make_request(self, tokens: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                     stop: Union[None, str, int, Sequence[Union[str, int]]] = None) -> Request:
        """A request for ``tokens``, checked against the model: length, token ids, stop rule.

        ``stop`` holds stop strings and stop token ids, besides the model's EOS tokens."""
        if not tokens:
            raise ArgumentError("LLM: a prompt must have at least one token")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ArgumentError(f"LLM: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if len(tokens) + max_new_tokens > self.max_seq_len:
            raise ArgumentError(f"LLM: prompt ({len(tokens)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                f"max_seq_len={self.max_seq_len}")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise ArgumentError(f"LLM: token ids must be in [0, {self.config.vocab_size})")
        single = stop is None or isinstance(stop, (str, Integral)) or not isinstance(stop, Iterable)
        stop = [] if stop is None else [stop] if single else list(stop)
        if not all((isinstance(s, str) and s) or (_is_int(s) and s >= 0) for s in stop):
            raise ArgumentError(f"LLM: stop must hold non-empty strings and token ids >= 0, got {stop!r}")
        rule = StopRule(frozenset(self.config.eos_token_ids) | {int(s) for s in stop if _is_int(s)},
                        tuple(s for s in stop if isinstance(s, str)), self.decode_text)
        return Request(list(tokens), len(tokens), max_new_tokens, stop=rule, sampling=sampling)


def _checked_text(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from undecodable bytes in argv
        raise ArgumentError(f"{where} is not valid text: {e.reason} at character {e.start}") from None
    return text


def _is_int(value) -> bool:
    # numpy and torch integers included; bool excluded (True is an int to Python, never a count).
    return isinstance(value, Integral) and not isinstance(value, bool)
