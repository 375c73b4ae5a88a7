"""``LLM``: load a checkpoint, then prefill and decode batches of prompts on tkpy's ops."""

from __future__ import annotations

import math
import time
from collections import deque
from os import PathLike
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..lserve import LServeConfig
from .config import ModelConfig
from .graphs import DecodeGraphs
from .kv_cache import PAGE_TOKENS, Batch, KVCache, PageAllocator
from .loader import (TINY_RANDOM, byte_tokenizer, checkpoint_layout, fill_weights, load_tokenizer, load_weights,
                     random_weights, tiny_random_config)
from .model import Transformer
from .request import Generation, Request, Timing, sample

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

        if max_batch_size < 1:
            raise ValueError(f"LLM: max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.pages_per_seq = math.ceil(self.max_seq_len / PAGE_TOKENS)
        # +1: page 0 and ring slot 0 are scratch (PageAllocator never hands them out).
        self.pages = PageAllocator(max_batch_size * self.pages_per_seq + 1, "pages")
        self.slots = PageAllocator(max_batch_size + 1, "ring slots")
        self.cache = KVCache(config, self.pages.count, self.slots.count, self.dtype, self.device, lserve)
        self.graphs = DecodeGraphs(self, max_batch_size) if cuda_graphs and self.device.type == "cuda" else None
        self.timing = Timing()
        self._step = 0

    # ---- public API -------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """float32 ``[len, vocab]``: the logits at every position of one prompt (for verification)."""
        seq = self._new_sequence(list(token_ids), 1)
        self._admit(seq)
        try:
            hidden, _ = self._prefill_hidden([seq])
            return self.model.logits(hidden)
        finally:
            self._release(seq)

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
        stop_ids = set(self.config.eos_token_ids) | {s for s in stop if isinstance(s, int)}
        stop_texts = [s for s in stop if isinstance(s, str)]
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        seqs = [self._new_sequence(self._encode(p), max_new_tokens) for p in prompts]
        waiting, running = deque(seqs), []
        self.timing = Timing()
        try:
            while waiting or running:
                self._generation_step(waiting, running, temperature, top_p, generator, stop_ids, stop_texts)
        finally:
            for seq in seqs:  # after an error, give back what unfinished sequences hold
                if seq.pages:
                    self._release(seq)
        return [Generation(s.generated, self._decode_text(s) if s.text is None else s.text, s.finish_reason)
                for s in seqs]

    def _generation_step(self, waiting: deque, running: list, temperature, top_p, generator, stop_ids,
                         stop_texts) -> None:
        """Prefill the prompts that fit, if any, else decode one token of every running sequence."""
        admitted = []
        while waiting and len(running) + len(admitted) < self.max_batch_size and self._fits(waiting[0]):
            admitted.append(waiting.popleft())
            self._admit(admitted[-1])
        start = time.perf_counter()
        if admitted:
            hidden, cu = self._prefill_hidden(admitted)
            logits = self.model.logits(hidden[cu[1:] - 1])
            self._step = 0
            running += admitted
        else:
            logits = self._decode_logits(running)
            self._step += 1
        next_tokens = sample(logits, temperature, top_p, generator).tolist()  # the host sync of the step
        elapsed = time.perf_counter() - start
        if admitted:
            self.timing.prefill_tokens += sum(s.prompt_len for s in admitted)
            self.timing.prefill_seconds += elapsed
        else:
            self.timing.decode_tokens += len(running)
            self.timing.decode_seconds += elapsed
        for seq, token in zip(admitted or running, next_tokens):
            seq.tokens.append(token)
            self._check_finished(seq, stop_ids, stop_texts)
        for seq in [s for s in running if s.finish_reason is not None]:
            running.remove(seq)
            self._release(seq)

    # ---- sequences and pages ----------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt).ids if isinstance(prompt, str) else [int(t) for t in prompt]

    def _decode_text(self, seq: Request) -> str:
        return self.tokenizer.decode(seq.generated, skip_special_tokens=True)

    def _new_sequence(self, tokens: list[int], max_new_tokens: int) -> Request:
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

    def _pages_needed(self, seq: Request) -> int:
        # The last generated token is never fed back, so the cache holds at most len - 1 tokens.
        return math.ceil((seq.prompt_len + seq.max_new_tokens - 1) / PAGE_TOKENS)

    def _fits(self, seq: Request) -> bool:
        return self.pages.num_free >= self._pages_needed(seq) and self.slots.num_free > 0

    def _admit(self, seq: Request) -> None:
        """Reserve the sequence's pages up front, so a running batch can never run out of them."""
        seq.pages = self.pages.allocate(self._pages_needed(seq))
        seq.slot = self.slots.allocate(1)[0]

    def _release(self, seq: Request) -> None:
        self.pages.free(seq.pages)
        self.slots.free([seq.slot])
        seq.pages = []
        # The batch changes: page selections cached for it no longer line up with its rows.
        self.cache.reset_selection()
        self._step = 0

    def _check_finished(self, seq: Sequence, stop_ids: set, stop_texts: list[str]) -> None:
        if seq.tokens[-1] in stop_ids:
            seq.finish_reason = "stop"
        elif stop_texts:
            text = self._decode_text(seq)
            cut = min((i for i in (text.find(s) for s in stop_texts) if i >= 0), default=-1)
            if cut >= 0:
                seq.finish_reason, seq.text = "stop", text[:cut]
        if seq.finish_reason is None and len(seq.generated) >= seq.max_new_tokens:
            seq.finish_reason = "length"

    def _tables(self, seqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables (int32 ``[B, pages_per_seq]``, padded with the scratch page) and slots."""
        rows = [s.pages + [0] * (self.pages_per_seq - len(s.pages)) for s in seqs]
        block_table = torch.tensor(rows, dtype=torch.int32, device=self.device)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.int32, device=self.device)
        return block_table, slots

    # ---- forward passes ---------------------------------------------------------------------

    def _prefill_hidden(self, seqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts packed into one pass; returns hidden ``[T, hidden]`` and cu_seqlens."""
        lengths = [s.prompt_len for s in seqs]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        tokens = torch.tensor([t for s in seqs for t in s.tokens[:s.prompt_len]], device=self.device)
        positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths]).to(self.device)
        block_table, slots = self._tables(seqs)
        batch = Batch(positions, block_table, self.cache.ring_table(slots),
                      torch.zeros(len(seqs), dtype=torch.int32, device=self.device), decode=False,
                      cu_seqlens=torch.tensor(starts, dtype=torch.int32, device=self.device), max_seqlen=max(lengths),
                      spans=tuple(zip(starts[:-1], starts[1:])))
        self.cache.reset_selection()
        return self.model(tokens, batch, self.cache), batch.cu_seqlens.long()

    def _decode_logits(self, seqs: list[Request]) -> torch.Tensor:
        """float32 ``[B, vocab]``: feed each sequence's newest token."""
        tokens = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        cache_seqlens = torch.tensor([len(s.tokens) - 1 for s in seqs], dtype=torch.int32, device=self.device)
        block_table, slots = self._tables(seqs)
        ring_table = self.cache.ring_table(slots)
        if self.graphs is not None:
            return self.graphs.run(tokens, cache_seqlens, block_table, ring_table, self._step)
        return self.decode_step(tokens, cache_seqlens, block_table, ring_table, self._step)

    def decode_step(self, tokens, cache_seqlens, block_table, ring_table, step: int) -> torch.Tensor:
        """One decode step on device tensors only (what a CUDA graph captures)."""
        batch = Batch(cache_seqlens, block_table, ring_table, cache_seqlens, decode=True, step=step,
                      context_lens=cache_seqlens + 1)
        return self.model.logits(self.model(tokens, batch, self.cache))

