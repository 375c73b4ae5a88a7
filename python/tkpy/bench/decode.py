"""Decode over a paged KV cache: dense :func:`tkpy.flash_attn_with_kvcache` read as a share of the
device's copy bandwidth, and LServe's :func:`tkpy.lserve.sparse_decode` (plus its page selector)
against dense paged decode on the same context (DESIGN §6)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch

from .. import flash_attn_with_kvcache
from ..lserve import LServeCache, LServeConfig, PageSelector, select_pages, sparse_decode
from .core import CaseResult, PreparedCase, _for_device, check_case
from .report import _case_cells, _check, _us
from .timing import Timing, measure_copy_bandwidth

DECODE_BYTES_CONVENTION = (
    "K and V of every context token read once, q read, out written: "
    "B*(2*ctx*Hkv + 2*Hq)*D*itemsize per call; lse and the page table not counted"
)
SPARSE_CONVENTION = (
    "both columns are credited with dense decode's bytes, so tkpy GB/s is dense-equivalent and ratio = "
    "dense time / sparse time; sparse_bytes counts whole 64-token pages: the selection's pages of the retrieval "
    "heads plus the ring pages of the streaming heads; DESIGN.md section 6 target: >= 8x dense paged at 128k"
)
PAGE = 64  # tokens per page: LServe's page, and the dense cases' page_size
BANDWIDTH_TARGET = 0.85  # DESIGN §6: dense paged decode >= 85% of the measured copy bandwidth
SPEEDUP_TARGET, SPEEDUP_TARGET_CONTEXT = 8.0, 131072  # DESIGN §6: sparse attention >= 8x dense paged at 128k
SELECTOR_STEPS = 4  # PageSelector timed over this many consecutive decode steps
# One case's inputs (every copy) may take this share of the GPU's memory; cases whose single copy
# does not fit are skipped before anything is allocated.
_MEMORY_SHARE = 0.85
_COPY_RUNS = {"cuda": (10, 50), "cpu": (2, 10)}  # (warm-up, timed) runs of the copy yardstick
_CHECKED = "sequences 0 and B-1 vs fp32 attention over the tokens each query head may see"


@functools.lru_cache(maxsize=None)
def _copy_gbps(device: torch.device) -> float:
    warmup, reps = _COPY_RUNS[device.type]
    return measure_copy_bandwidth(device, warmup=warmup, reps=reps)


def copy_bandwidth_gbps(device: Union[str, torch.device]) -> float:
    """:func:`measure_copy_bandwidth` (read + write GB/s of a large device-to-device copy), measured
    once per process and device, then cached: every bandwidth figure of a run uses the same yardstick."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _copy_gbps(device)


def _auto_num_splits(batch: int, heads_kv: int, context: int, device: torch.device) -> int:
    """The split count of ``num_splits=0`` for dense decode, as csrc/ops/decode.cpp picks it:
    ``choose_num_splits(B*Hkv, table pages, SMs or CPU threads)`` of include/tkpy/detail/paged_index.h,
    mirrored here for the record."""
    if device.type == "cuda":
        workers = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        workers = torch.get_num_threads()
    pages = math.ceil(context / PAGE)
    return max(1, min(math.ceil(2 * workers / (batch * heads_kv)), max(1, pages // 4), 64))


def _api_info(api: Timing) -> dict[str, Any]:
    return {
        "api_median_us": api.median_s * 1e6,
        "timed": "tkpy_median_us: the decode_attention launch alone, as the public function makes it; "
        "api_median_us: the public function, whose per-call host-side checks of the tables sync with the device",
    }


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class _DecodeInputs(NamedTuple):
    """One input copy: a query step and its sequences' pages. The sparse cases add LServe's pools."""

    q: torch.Tensor  # [B, 1, Hq, D]
    k_pool: torch.Tensor  # [pages of every copy, 64, Hkv, D], shared by the copies
    v_pool: torch.Tensor
    table: torch.Tensor  # int32 [B, pages]: this copy's pages, scattered through the pool
    seqlens: torch.Tensor  # int32 [B]
    cache: Optional[LServeCache] = None  # holds the same keys and values as the dense pages
    lserve_table: Optional[torch.Tensor] = None
    ring_table: Optional[torch.Tensor] = None
    selection: Any = None  # the PageSelection of this step, prebuilt


@dataclass(frozen=True)
class _DecodeShape:
    """What the dense and sparse cases share: B sequences of ``context`` tokens, one query token each."""

    batch: int
    context: int
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    _scratch_copies: ClassVar[int] = 0  # copies' worth of memory that filling the inputs needs besides

    @property
    def pages(self) -> int:
        return math.ceil(self.context / PAGE)

    def _kv_bytes(self, heads: int) -> int:
        """K and V of ``pages`` whole pages of ``heads`` heads, for every sequence."""
        return 2 * self.batch * self.pages * PAGE * heads * self.head_dim * self.dtype.itemsize

    def work(self) -> int:
        """Dense decode's bytes per call (:data:`DECODE_BYTES_CONVENTION`)."""
        qo = 2 * self.batch * self.heads_q * self.head_dim * self.dtype.itemsize
        return qo + 2 * self.batch * self.context * self.heads_kv * self.head_dim * self.dtype.itemsize

    def copy_bytes(self) -> int:
        """Memory one input copy takes."""
        return self._kv_bytes(self.heads_kv)

    def copies_that_fit(self, device: Union[str, torch.device], wanted: int) -> int:
        """At most ``wanted`` copies that fit, with ``_scratch_copies`` more, in :data:`_MEMORY_SHARE` of
        the GPU's memory; 0 when not even one does. The CPU: ``wanted``."""
        device = torch.device(device)
        if device.type != "cuda":
            return wanted
        budget = _MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory
        return max(0, min(wanted, int(budget // self.copy_bytes()) - self._scratch_copies))

    def fits(self, device: Union[str, torch.device]) -> bool:
        """Whether one input copy fits on ``device``; computed from sizes, allocates nothing."""
        return self.copies_that_fit(device, 1) > 0

    def _dense_copies(
        self, device: torch.device, generator: torch.Generator, count: int, fill: bool
    ) -> list[_DecodeInputs]:
        """``count`` copies sharing one pool, each with its own scattered pages (a random permutation of
        the pool) and query. ``fill``: random normal pages; else left for the caller to fill."""
        pool_shape = (count * self.batch * self.pages, PAGE, self.heads_kv, self.head_dim)
        if fill:
            k_pool, v_pool = (torch.randn(pool_shape, generator=generator, device=device, dtype=self.dtype)
                              for _ in range(2))
        else:
            k_pool, v_pool = (torch.empty(pool_shape, device=device, dtype=self.dtype) for _ in range(2))
        order = torch.randperm(pool_shape[0], generator=generator, device=device).to(torch.int32)
        tables = order.view(count, self.batch, self.pages)
        seqlens = torch.full((self.batch,), self.context, dtype=torch.int32, device=device)
        q_shape = (self.batch, 1, self.heads_q, self.head_dim)
        return [
            _DecodeInputs(torch.randn(q_shape, generator=generator, device=device, dtype=self.dtype),
                          k_pool, v_pool, tables[c], seqlens)
            for c in range(count)
        ]

    def run_dense(self, x: _DecodeInputs) -> torch.Tensor:
        """Dense decode as :func:`tkpy.flash_attn_with_kvcache` launches it, without the API's per-call
        host-side checks of the table (one host sync each): the kernel's time."""
        out, _ = torch.ops.tkpy.decode_attention(
            x.q, x.k_pool, x.v_pool, x.table, x.seqlens, None, None, None, None, None, 0, 0, None, None, None,
            1.0, 1.0, 1.0 / math.sqrt(self.head_dim), -1, -1, 0.0, 0,
        )
        return out

    @property
    def _checked_seqs(self) -> list[int]:
        return sorted({0, self.batch - 1})

    def _reference(self, x: _DecodeInputs, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 attention of :attr:`_checked_seqs` over their pages, ``[len(_checked_seqs), Hq, D]``;
        ``keep`` bool ``[B, Hq, context]``: True where a query head may see the token (default: all).
        One KV head at a time, so that a 256k-token sequence needs a few hundred MB."""
        group, scale = self.heads_q // self.heads_kv, 1.0 / math.sqrt(self.head_dim)
        rows = []
        for b in self._checked_seqs:
            k, v = (pool[x.table[b].long()].flatten(0, 1)[: self.context] for pool in (x.k_pool, x.v_pool))
            for h in range(self.heads_kv):
                heads = slice(h * group, (h + 1) * group)
                scores = (x.q[b, 0, heads].float() @ k[:, h].float().T) * scale
                if keep is not None:
                    scores = scores.masked_fill(~keep[b, heads], -math.inf)
                rows.append(scores.softmax(-1) @ v[:, h].float())
        return torch.cat(rows).view(-1, self.heads_q, self.head_dim)

    def _checked(self, x: _DecodeInputs, reference: torch.Tensor) -> tuple[tuple, tuple]:
        """``run_tkpy``'s and ``run_api``'s rows of sequences 0 and B-1, each against ``reference``."""
        rows = self._checked_seqs
        return (self.run_tkpy(x)[rows, 0], self.run_api(x)[rows, 0]), (reference, reference)


# --------------------------------------------------------------------------------------------
# Dense paged decode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCase(_DecodeShape):
    """Dense paged decode: :func:`tkpy.flash_attn_with_kvcache` with a block table (page_size 64),
    one query token per sequence, ``num_splits=0`` (automatic). The yardstick is the device's copy
    bandwidth (:func:`copy_bandwidth_gbps`), recorded as the peer."""

    op: ClassVar[str] = "flash_attn_with_kvcache"
    metric: ClassVar[str] = "GB/s"
    peer: ClassVar[str] = "device copy (Tensor.copy_, read + write)"

    @property
    def id(self) -> str:
        return f"B{self.batch}-ctx{self.context}"

    @property
    def shape(self) -> str:
        return f"B{self.batch} ctx{self.context} Hq{self.heads_q} Hkv{self.heads_kv} D{self.head_dim} page{PAGE}"

    def input_bytes(self) -> int:
        return self.copy_bytes()

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` (as memory allows) 1-tuples of :class:`_DecodeInputs`: random normal pages and queries."""
        count = self.copies_that_fit(device, count)
        if count < 1:
            raise ValueError(f"{self.op} {self.id}: one copy of the cache does not fit on {device}")
        return [(x,) for x in self._dense_copies(device, generator, count, fill=True)]

    def run_tkpy(self, x: _DecodeInputs) -> torch.Tensor:
        return self.run_dense(x)

    def run_api(self, x: _DecodeInputs) -> torch.Tensor:
        return flash_attn_with_kvcache(x.q, x.k_pool, x.v_pool, cache_seqlens=x.seqlens, block_table=x.table)

    def outputs(self, x: _DecodeInputs) -> tuple[tuple, tuple]:
        """The timed launch and the public API, each against the fp32 reference."""
        return self._checked(x, self._reference(x))


@dataclass(frozen=True)
class DecodeResult(CaseResult):
    """A :class:`DecodeCase`: tkpy's GB/s against the measured copy bandwidth (``peer`` is None)."""

    copy_gbps: float = math.nan
    num_splits: int = 0
    api: Optional[Timing] = None  # the public function, host-side checks included

    @property
    def copy_share(self) -> float:
        """tkpy GB/s over the copy's GB/s."""
        return self.tkpy_rate / self.copy_gbps

    @property
    def gated(self) -> bool:
        return self.device == "cuda"

    @property
    def meets_target(self) -> Optional[bool]:
        return self.copy_share >= BANDWIDTH_TARGET if self.gated else None

    def as_extra_info(self) -> dict[str, Any]:
        """:meth:`CaseResult.as_extra_info` with the copy as the peer: ``ratio`` = share of copy bandwidth."""
        case = self.case
        return {
            **super().as_extra_info(),
            "bytes_convention": DECODE_BYTES_CONVENTION,
            "peer_gbps": self.copy_gbps, "ratio": self.copy_share, "copy_gbps": self.copy_gbps,
            "pct_of_copy": 100 * self.copy_share,
            "target_pct_of_copy": 100 * BANDWIDTH_TARGET if self.gated else None,
            "meets_target": self.meets_target,
            "gate": "DESIGN.md section 6: >= 85% of the measured copy bandwidth" if self.gated
            else "not gated: CPU path",
            "num_splits": 0, "num_splits_auto": self.num_splits,
            "num_splits_note": "timed with num_splits=0 (automatic); num_splits_auto mirrors paged_index.h "
            "choose_num_splits(B*Hkv, table pages, SMs or CPU threads)",
            **_api_info(self.api), "check": _CHECKED,
            "batch": case.batch, "context": case.context, "heads_q": case.heads_q, "heads_kv": case.heads_kv,
            "head_dim": case.head_dim, "page_size": PAGE, "runs": len(self.tkpy.samples_s),
        }


def measure_decode(prepared: PreparedCase, *, warmup: int, reps: int) -> DecodeResult:
    """Check dense decode on sequences 0 and B-1, then time it; the yardstick is measured once per process."""
    case, device = prepared.case, prepared.device
    rel_err = check_case(prepared)
    timing, api = (prepared.time(fn, warmup=warmup, reps=reps) for fn in (case.run_tkpy, case.run_api))
    splits = _auto_num_splits(case.batch, case.heads_kv, case.context, device)
    return DecodeResult(
        case, device.type, case.work(), timing, None, rel_err, copy_bandwidth_gbps(device), splits, api
    )


# --------------------------------------------------------------------------------------------
# LServe sparse decode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseDecodeCase(_DecodeShape):
    """:func:`tkpy.lserve.sparse_decode` on a prebuilt selection (``token_budget``), every other KV head
    streaming (``sink`` + ``local`` tokens), against dense paged decode of the same keys and values.
    The selector is timed too: :func:`select_pages` alone, and a :class:`PageSelector` over
    :data:`SELECTOR_STEPS` steps with reuse interval 4 and 1."""

    op: ClassVar[str] = "sparse_decode"
    metric: ClassVar[str] = "GB/s"
    peer: ClassVar[str] = "tkpy.flash_attn_with_kvcache (dense paged)"
    _scratch_copies: ClassVar[int] = 1  # each copy is filled from a dense-sized source

    token_budget: int = 4096
    sink: int = 128
    local: int = 256

    @property
    def id(self) -> str:
        return f"B{self.batch}-ctx{self.context}-T{self.token_budget}"

    @property
    def shape(self) -> str:
        return (f"B{self.batch} ctx{self.context} Hq{self.heads_q} Hkv{self.heads_kv} D{self.head_dim} "
                f"budget{self.token_budget} 50% streaming sink{self.sink} local{self.local}")

    @property
    def streaming(self) -> list[bool]:
        """Which KV heads stream: every other one."""
        return [h % 2 == 1 for h in range(self.heads_kv)]

    def sparse_bytes(self, x: _DecodeInputs) -> int:
        """What sparse decode reads and writes on ``x``, in whole pages (:data:`SPARSE_CONVENTION`)."""
        pages = int(x.selection.page_counts[:, ~x.cache.kv_head_streaming].sum())
        pages += self.batch * x.cache.num_streaming_heads * min(x.cache.ring_pages, self.pages)
        qo = 2 * self.batch * self.heads_q * self.head_dim * self.dtype.itemsize
        return qo + 2 * pages * PAGE * self.head_dim * self.dtype.itemsize

    def input_bytes(self) -> int:
        """Roughly what one sparse call reads (the budget's pages per head), which sizes the rotation."""
        tokens = min(self.context, self.token_budget + self.sink + self.local)
        return 2 * self.batch * self.heads_kv * tokens * self.head_dim * self.dtype.itemsize

    def copy_bytes(self) -> int:
        """The dense pages, LServe's retrieval pool (half the heads) and its fp32 stats (4 logical pages)."""
        heads_r = self.heads_kv - sum(self.streaming)
        stats = 2 * self.batch * self.pages * 4 * heads_r * self.head_dim * 4
        return self._kv_bytes(self.heads_kv) + self._kv_bytes(heads_r) + stats

    def config(self) -> LServeConfig:
        return LServeConfig(sink=self.sink, local=self.local, token_budget=self.token_budget)

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` (as memory allows) 1-tuples of :class:`_DecodeInputs`: each copy's random keys and
        values go into its dense pages and, by one prefill append, into its rows of one LServe cache;
        then its selection is built once."""
        count = self.copies_that_fit(device, count)
        if count < 1:
            raise ValueError(f"{self.op} {self.id}: one copy of the caches does not fit on {device}")
        dense = self._dense_copies(device, generator, count, fill=False)
        cache = LServeCache(count * self.batch * self.pages, count * self.batch, self.streaming, self.head_dim,
                            self.dtype, self.config(), device)
        order = torch.randperm(count * self.batch * self.pages, generator=generator, device=device)
        tables = order.to(torch.int32).view(count, self.batch, self.pages)
        zeros = torch.zeros(self.batch, dtype=torch.int32, device=device)
        copies = []
        for c, x in enumerate(dense):
            ring = cache.ring_table(torch.arange(c * self.batch, (c + 1) * self.batch, dtype=torch.int32,
                                                 device=device))
            shape = (self.batch, self.pages, PAGE, self.heads_kv, self.head_dim)
            k, v = (torch.randn(shape, generator=generator, device=device, dtype=self.dtype) for _ in range(2))
            x.k_pool[x.table.long()], x.v_pool[x.table.long()] = k, v
            tokens = slice(0, self.context)
            cache.append(k.flatten(1, 2)[:, tokens], v.flatten(1, 2)[:, tokens], tables[c], ring, zeros)
            del k, v
            selection = select_pages(x.q, cache.stats, tables[c], x.seqlens, self.token_budget)
            copies.append((x._replace(cache=cache, lserve_table=tables[c], ring_table=ring, selection=selection),))
        return copies

    def run_tkpy(self, x: _DecodeInputs) -> torch.Tensor:
        """Sparse decode as :func:`tkpy.lserve.sparse_decode` launches it, without its host-side checks."""
        c, sel = x.cache, x.selection
        out, _ = torch.ops.tkpy.decode_attention(
            x.q, c.k, c.v, x.lserve_table, x.seqlens, None, c.kv_head_slot, c.k_ring, c.v_ring, x.ring_table,
            c.sink, c.local, sel.page_indices, sel.page_counts, sel.head_bits, c.k_scale, c.v_scale,
            1.0 / math.sqrt(self.head_dim), -1, -1, 0.0, 0,
        )
        return out

    def run_api(self, x: _DecodeInputs) -> torch.Tensor:
        return sparse_decode(x.q, x.cache, x.lserve_table, x.ring_table, x.seqlens, selection=x.selection)

    def run_peer(self, x: _DecodeInputs) -> torch.Tensor:
        return self.run_dense(x)

    def run_select(self, x: _DecodeInputs) -> Any:
        return select_pages(x.q, x.cache.stats, x.lserve_table, x.seqlens, self.token_budget)

    def outputs(self, x: _DecodeInputs) -> tuple[tuple, tuple]:
        """Sparse decode against fp32 attention over the selected pages (retrieval heads; the newest page
        always) and sink ∪ local (streaming heads)."""
        token = torch.arange(self.context, device=x.q.device)
        keep = x.selection.selected[:, :, : self.pages].repeat_interleave(PAGE, dim=2)[:, :, : self.context].clone()
        keep[:, :, (self.pages - 1) * PAGE:] = True
        window = (token < self.sink) | (token >= self.context - self.local)
        streaming_q = torch.tensor(self.streaming, device=x.q.device).repeat_interleave(
            self.heads_q // self.heads_kv)
        keep[:, streaming_q] = window
        return self._checked(x, self._reference(x, keep))


def _selector_steps(selector: PageSelector) -> Any:
    """A call that runs ``selector`` over :data:`SELECTOR_STEPS` consecutive decode steps."""

    def run(x: _DecodeInputs) -> None:
        for step in range(SELECTOR_STEPS):
            selector(step, x.q, x.cache.stats, x.lserve_table, x.seqlens)

    return run


@dataclass(frozen=True)
class SparseDecodeResult(CaseResult):
    """A :class:`SparseDecodeCase`: sparse (``tkpy``) and dense (``peer``) decode, the selector's costs.

    ``selector`` maps ``"select_pages"`` to one call's timing and ``"reuse4"`` / ``"reuse1"`` to a
    :class:`PageSelector`'s timing over :data:`SELECTOR_STEPS` steps."""

    sparse_bytes: int = 0
    selector: dict[str, Timing] = field(default_factory=dict)
    api: Optional[Timing] = None  # the public function, host-side checks included

    @property
    def target(self) -> Optional[float]:
        """DESIGN §6's speedup target where it applies (128k on the GPU); else None (not gated)."""
        return SPEEDUP_TARGET if self.device == "cuda" and self.case.context == SPEEDUP_TARGET_CONTEXT else None

    @property
    def meets_target(self) -> Optional[bool]:
        return None if self.target is None else self.speedup >= self.target

    def selector_step_s(self, interval: int) -> float:
        """The selector's amortised cost per decode step at reuse ``interval``."""
        return self.selector[f"reuse{interval}"].median_s / SELECTOR_STEPS

    @property
    def speedup_with_selection(self) -> float:
        """Dense time over sparse time plus the selector's cost per step at reuse interval 4."""
        return self.peer.median_s / (self.tkpy.median_s + self.selector_step_s(4))

    def as_extra_info(self) -> dict[str, Any]:
        """:meth:`CaseResult.as_extra_info` (``ratio``: the speedup), the target and the selector's costs."""
        case = self.case
        return {
            **super().as_extra_info(),
            "bytes_convention": f"{DECODE_BYTES_CONVENTION}; {SPARSE_CONVENTION}",
            "sparse_bytes": self.sparse_bytes, "sparse_gbps": self.sparse_bytes / self.tkpy.median_s / 1e9,
            "speedup": self.speedup, "target_speedup": self.target, "meets_target": self.meets_target,
            "gate": f"DESIGN.md section 6: >= {SPEEDUP_TARGET:g}x dense paged at {SPEEDUP_TARGET_CONTEXT}"
            if self.target else "not gated: the target is stated at 128k on the GPU",
            "select_pages_us": self.selector["select_pages"].median_s * 1e6,
            "selector_us_per_step_reuse4": self.selector_step_s(4) * 1e6,
            "selector_us_per_step_reuse1": self.selector_step_s(1) * 1e6,
            "selector_steps": SELECTOR_STEPS,
            "speedup_with_selection_reuse4": self.speedup_with_selection,
            **_api_info(self.api), "check": _CHECKED,
            "batch": case.batch, "context": case.context, "heads_q": case.heads_q, "heads_kv": case.heads_kv,
            "head_dim": case.head_dim, "token_budget": case.token_budget, "sink": case.sink, "local": case.local,
            "streaming_kv_heads": [h for h, s in enumerate(case.streaming) if s], "runs": len(self.tkpy.samples_s),
        }


def measure_sparse_decode(prepared: PreparedCase, *, warmup: int, reps: int) -> SparseDecodeResult:
    """Check sparse decode on sequences 0 and B-1, then time it, dense decode and the selector."""
    case = prepared.case
    rel_err = check_case(prepared)
    tkpy_timing, peer_timing, api = (
        prepared.time(fn, warmup=warmup, reps=reps) for fn in (case.run_tkpy, case.run_peer, case.run_api)
    )
    selector = {"select_pages": prepared.time(case.run_select, warmup=warmup, reps=reps)}
    for interval in (4, 1):
        run = _selector_steps(PageSelector(token_budget=case.token_budget, reuse_interval=interval))
        selector[f"reuse{interval}"] = prepared.time(run, warmup=warmup, reps=reps)
    sparse_bytes = case.sparse_bytes(prepared.arg_sets[0][0])
    return SparseDecodeResult(
        case, prepared.device.type, case.work(), tkpy_timing, peer_timing, rel_err, sparse_bytes, selector, api
    )


# --------------------------------------------------------------------------------------------
# Cases and report
# --------------------------------------------------------------------------------------------

_CONTEXTS = tuple(4096 << n for n in range(7))  # 4k .. 256k
_CUDA_DECODE_CASES = tuple(DecodeCase(b, ctx) for b in (1, 8, 64) for ctx in _CONTEXTS)
_CUDA_SPARSE_CASES = tuple(SparseDecodeCase(b, ctx) for b in (1, 8) for ctx in _CONTEXTS[3:])
# 4000 tokens end in a partial page; the CPU's sparse cases keep the budget below the context.
_CPU_DECODE_CASES = (DecodeCase(1, 1024), DecodeCase(2, 4000))
_CPU_SPARSE_CASES = (SparseDecodeCase(1, 2048, token_budget=512), SparseDecodeCase(2, 4000, token_budget=1024))


def decode_cases(device: Union[str, torch.device]) -> list[DecodeCase]:
    """Dense paged decode, bf16, Hq=32, Hkv=8, D=128, page 64. CUDA: B 1, 8, 64 at contexts 4k to
    256k (run only where :meth:`DecodeCase.fits`). CPU: B=1 at 1k, B=2 at 4000. Listing allocates nothing."""
    return _for_device(device, _CUDA_DECODE_CASES, _CPU_DECODE_CASES)


def sparse_decode_cases(device: Union[str, torch.device]) -> list[SparseDecodeCase]:
    """LServe sparse decode vs dense, same shapes. CUDA: B 1 and 8 at contexts 32k to 256k, budget 4096.
    CPU: B=1 at 2k (budget 512), B=2 at 4000 (budget 1024). Listing allocates nothing."""
    return _for_device(device, _CUDA_SPARSE_CASES, _CPU_SPARSE_CASES)


def _meets(value: Optional[bool]) -> str:
    return "not gated" if value is None else "yes" if value else "NO"


def format_decode_tables(results: Sequence[CaseResult]) -> list[str]:
    """The report's decode tables: dense against the copy bandwidth, then sparse against dense."""
    dense = [r for r in results if isinstance(r, DecodeResult)]
    sparse = [r for r in results if isinstance(r, SparseDecodeResult)]
    lines: list[str] = []
    if dense:
        lines += [
            "", f"dense paged decode, num_splits=0 (automatic): {DECODE_BYTES_CONVENTION}",
            f"'% copy' = GB/s / the measured copy bandwidth, {dense[0].copy_gbps:,.1f} GB/s; target >= "
            f"{100 * BANDWIDTH_TARGET:.0f}% on the GPU (DESIGN.md section 6); check: {_CHECKED}",
            "", "| op | case | shape | dtype | tkpy us | GB/s | % copy | meets | auto splits | check |",
            "|---|---|---|---|--:|--:|--:|---|--:|---|",
        ]
        lines += [
            f"{_case_cells(r)}| {_us(r.tkpy)} | {r.tkpy_rate:,.1f} | {100 * r.copy_share:.1f}% "
            f"| {_meets(r.meets_target)} | {r.num_splits or '-'} | {_check(r)} |"
            for r in dense
        ]
    if sparse:
        lines += [
            "", f"LServe sparse decode on a prebuilt selection vs dense paged decode: {SPARSE_CONVENTION}",
            f"selector: select_pages alone, and a PageSelector over {SELECTOR_STEPS} steps per decode step at "
            "reuse interval 4 and 1; 'with sel.' = dense / (sparse + selector per step at interval 4)",
            "", "| op | case | shape | dtype | sparse us | dense us | speedup | target | meets | select us "
            "| sel./step r4 us | sel./step r1 us | with sel. | check |",
            "|---|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|---|",
        ]
        lines += [
            f"{_case_cells(r)}| {_us(r.tkpy)} | {_us(r.peer)} | {r.speedup:.2f}x "
            f"| {'-' if r.target is None else f'{r.target:g}x'} | {_meets(r.meets_target)} "
            f"| {_us(r.selector['select_pages'])} | {1e6 * r.selector_step_s(4):,.1f} "
            f"| {1e6 * r.selector_step_s(1):,.1f} | {r.speedup_with_selection:.2f}x | {_check(r)} |"
            for r in sparse
        ]
    return lines
