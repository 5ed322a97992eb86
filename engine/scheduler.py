"""Continuous batching over the paged KV cache: requests join and leave between steps.

A ``Scheduler`` owns a fixed number of slots and a page pool. Each step it
admits queued requests into free slots, packs one ragged batch (every
decoding slot's root + draft tree, then prefill chunks of the slots still
reading their prompts, up to ``prefill_budget`` prompt rows: chunked prefill
mixed with verify rows in one step), runs ``paged_steps.paged_step`` and books
what each slot emitted. Every slot has its own length, budget, sampling
settings, seed, drafter and tree size. A request that finishes or is
cancelled releases its pages at once.

Pages: a request is admitted only when the pool can hold its worst case on
top of every running request's (its prompt plus ``max_new_tokens - 1`` cached
tokens: trees are cut to the budget left, so no step needs more), so a step
never runs out of pages and nothing is ever preempted; a request that cannot
fit yet waits in the queue (bounded by ``max_queue``), one that could never fit
is refused at ``submit``. Pages holding a prefix already in the pool (a
system prompt, an earlier turn) are shared through the allocator and count
once. Conservative: vLLM admits on the current need and preempts instead.

Tree size: each decoding slot's host drafter proposes up to ``max_tree`` nodes
and the budget left. With ``auto_tree`` a ``row_policy.RowPolicy`` cuts the
proposals: it gives rows to the slots' nodes with the highest calibrated
expected accepted tokens while that pays for the larger row bucket, timed per
bucket on the steps run (0 nodes for a slot: a plain step for it). Without it,
every slot verifies its whole proposal.

Host drafters are driven as the ``Engine`` drives them: ``start_request`` with
the prompt on admission, ``observe`` with every emitted token (the first one
included), ``propose`` before each decoding step, ``stop_request`` on finish or
cancel.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import HostDrafter, Proposal, attach_host_drafter, check_proposals
from specjax.engine import paged_steps
from specjax.engine.paged_cache import PageAllocator
from specjax.engine.paged_steps import Work, pack_batch
from specjax.engine.row_policy import RowPolicy, row_buckets
from specjax.engine.sampling import SamplingParams, request_keys, request_seeds
from specjax.models.loading import Model


class QueueFull(RuntimeError):
    """The scheduler's queue holds ``max_queue`` requests already; retry later."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: prompt ids, a token budget, sampling settings and seed (see
    ``engine.sampling``: the output equals plain sampling with this seed), and optionally its own
    host drafter (default: the scheduler's)."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    drafter: Optional[HostDrafter] = None


@dataclasses.dataclass
class Result:
    """A request's output so far; ``status`` is "queued", "running", "finished" or "cancelled"."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    status: str = "queued"
    passes: int = 0  # steps that emitted tokens for it (prefill's first token included)
    accepted: int = 0  # draft tokens accepted


@dataclasses.dataclass(frozen=True)
class Event:
    """What one step emitted for one request."""

    rid: Hashable
    tokens: list[int]
    finished: bool


@dataclasses.dataclass(frozen=True)
class StepStats:
    """The last step's shape: slots that verified a tree (or a plain root), slots that read a prompt
    chunk, packed rows (before padding), draft nodes verified, tokens emitted, draft tokens accepted."""

    tree_slots: int = 0
    prefill_slots: int = 0
    rows: int = 0
    drafted: int = 0
    emitted: int = 0
    accepted: int = 0


@dataclasses.dataclass
class _Running:
    rid: Hashable
    request: Request
    slot: int
    need_pages: int  # worst case, admitted against the pool
    drafter: Optional[HostDrafter]
    prefilled: int = 0  # prompt tokens whose KV is written
    root: int = 0  # newest emitted token, not cached yet (the next tree's root)
    remaining: int = 0  # token budget left (max_new_tokens until the first token)
    claimed: float = 0.0  # draft tokens its verified nodes' probabilities claimed (the auto size's calibration)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)


class Scheduler:
    """Continuous batching of ``Request``s on one model (see the module docstring).

    Args:
      model: the target.
      max_slots: sequences per step (the fixed S of the step's shapes).
      num_pages, page_size, max_pages_per_seq: the page pool (``PageAllocator``).
      max_tree: largest draft tree per slot (N = max_tree + 1 acceptance nodes).
      prefill_budget: prompt rows per step, shared by the prefilling slots in
        arrival order (chunked prefill); also the static bound on one
        sequence's rows with ``max_tree + 1``.
      drafter: the host drafter for requests without their own (None: plain steps).
      attention: the ragged attention impl ("xla" the reference, "pallas", "auto").
      max_queue: bound on waiting requests (None: unbounded); ``submit`` raises
        ``QueueFull`` past it.
      auto_tree: cut each slot's proposal to what pays for its rows (``RowPolicy``); False:
        verify whole proposals.
    """

    def __init__(self, model: Model, *, max_slots: int = 8, num_pages: int = 256, page_size: int = 16,
                 max_pages_per_seq: int = 64, max_tree: int = 8, prefill_budget: int = 64,
                 drafter: Optional[HostDrafter] = None, attention: str = "xla", max_queue: Optional[int] = None,
                 auto_tree: bool = False):
        if max_slots < 1 or max_tree < 0 or prefill_budget < 1:
            raise ValueError(f"need max_slots >= 1, max_tree >= 0, prefill_budget >= 1; got {max_slots}, "
                             f"{max_tree}, {prefill_budget}")
        self.model, self.cfg = model, model.config
        self.max_slots, self.max_tree, self.prefill_budget = max_slots, max_tree, prefill_budget
        self.attention, self.max_queue = attention, max_queue
        self.allocator = PageAllocator(num_pages, page_size, max_pages_per_seq)
        shape = (self.cfg.num_layers, num_pages, self.cfg.num_kv_heads, page_size, self.cfg.head_dim)
        dtype = model.params["embed"].dtype
        self.k_pages, self.v_pages = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        self.drafter = drafter
        if drafter is not None:
            attach_host_drafter(drafter, self)
        self.results: dict[Hashable, Result] = {}
        self._queue: collections.deque[tuple[Hashable, Request]] = collections.deque()
        self._running: dict[Hashable, _Running] = {}
        self._slots: list[Optional[Hashable]] = [None] * max_slots
        self._ids = itertools.count()
        self._max_q_len = max(prefill_budget, max_tree + 1)
        self._seeds = np.zeros(max_slots, np.int64)
        self._keys: Optional[jax.Array] = None  # rebuilt when the slots' seeds change
        self.last_step = StepStats()
        self.policy = RowPolicy(row_buckets(max_slots * (max_tree + 1) + prefill_budget)) if auto_tree else None

    # ------------------------------------------------------------ requests

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def submit(self, request: Request, rid: Optional[Hashable] = None) -> Hashable:
        """Queue a request; returns its id. Raises ValueError for a request that can never run, QueueFull."""
        self._check(request)
        if self.max_queue is not None and len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue={self.max_queue})")
        rid = next(self._ids) if rid is None else rid
        if rid in self.results:
            raise ValueError(f"request id {rid!r} is already used")
        if request.drafter is not None:
            attach_host_drafter(request.drafter, self)
        self._queue.append((rid, request))
        self.results[rid] = Result()
        return rid

    def cancel(self, rid: Hashable) -> bool:
        """Stop a queued or running request now (its pages are released); False if it already ended."""
        result = self.results[rid]
        if result.status == "queued":
            self._queue.remove(next(item for item in self._queue if item[0] == rid))
        elif result.status == "running":
            self._retire(self._running[rid])
        else:
            return False
        result.status = "cancelled"
        return True

    def has_work(self) -> bool:
        return bool(self._queue or self._running)

    def run(self) -> dict[Hashable, Result]:
        """Step until every submitted request has ended; returns ``results``."""
        while self.has_work():
            self.step()
        return self.results

    # ------------------------------------------------------------ one step

    def step(self) -> list[Event]:
        """Admit what fits, run one packed step, book its tokens; returns what each request emitted."""
        self._admit()
        prefills = self._prefill_works()
        decodes, claims = self._decode_works(sum(work.rows for work in prefills))
        works = decodes + prefills
        self.last_step = StepStats()
        if not works:
            return []
        slots = list(self._slots)
        running = [self._running.get(rid) if rid is not None else None for rid in slots]
        remaining = np.array([0 if run is None else run.remaining for run in running], np.int32)
        batch = pack_batch(works, self._page_tables(slots), remaining, self._slot_keys(), self._sampling(running),
                           self.max_tree + 1)
        start = time.perf_counter()
        self.k_pages, self.v_pages, accepted = paged_steps.paged_step(
            self.model.params, self.k_pages, self.v_pages, batch, cfg=self.cfg, attention=self.attention,
            eos_ids=tuple(self.cfg.eos_token_ids), max_q_len=self._max_q_len)
        tokens, num, drafts, hit_eos = jax.device_get(
            (accepted.tokens, accepted.num, accepted.num_draft_accepted, accepted.hit_eos))
        if self.policy is not None:
            self.policy.record(sum(work.rows for work in works), time.perf_counter() - start, sum(claims.values()),
                               int(drafts.sum()))
        for slot, claimed in claims.items():
            running[slot].claimed += claimed
        events = []
        for work in works:
            run = running[work.slot]
            emitted = [int(t) for t in tokens[work.slot, : num[work.slot]]]
            if work.parents is None:
                self.allocator.commit(run.rid, work.tokens)
                run.prefilled += work.rows
            else:
                self.allocator.commit(run.rid, [run.root] + emitted[:-1])
            if work.emits:
                events.append(self._emit(run, emitted, int(drafts[work.slot]), bool(hit_eos[work.slot])))
        trees = [work for work in works if work.parents is not None]
        self.last_step = StepStats(len(trees), len(works) - len(trees), sum(work.rows for work in works),
                                   sum(work.rows - 1 for work in trees), int(num.sum()), int(drafts.sum()))
        return events

    def audit(self) -> list[str]:
        """Broken invariants, empty when sound: the allocator's, and slots, pages and requests agree."""
        problems = list(self.allocator.audit())
        held = [rid for rid in self._slots if rid is not None]
        if sorted(map(repr, held)) != sorted(map(repr, self._running)):
            problems.append(f"slots hold {held}, running are {list(self._running)}")
        for run in self._running.values():
            if self._slots[run.slot] != run.rid:
                problems.append(f"request {run.rid!r} is not in its slot {run.slot}")
            cached = run.prefilled + (len(self.results[run.rid].tokens) - 1 if run.decoding else 0)
            if self.allocator.length(run.rid) != cached:
                problems.append(f"request {run.rid!r}: {self.allocator.length(run.rid)} tokens cached, "
                                f"expected {cached}")
            if len(self.allocator.pages(run.rid)) > run.need_pages:
                problems.append(f"request {run.rid!r} holds more pages than it was admitted for")
        if not self._running and self.allocator.num_in_use:
            problems.append(f"{self.allocator.num_in_use} pages in use with no request running")
        return problems

    # ------------------------------------------------------------ internals

    def _check(self, request: Request) -> None:
        """Refuse a request that can never run, naming the problem."""
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or len(prompt) == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError("the prompt must be a non-empty sequence of token ids")
        if prompt.min() < 0 or prompt.max() >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, (int, np.integer)) \
                or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {request.max_new_tokens!r}")
        total = len(prompt) + request.max_new_tokens
        if total > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({request.max_new_tokens}) exceed the "
                             f"model's max_position_embeddings ({self.cfg.max_position_embeddings})")
        pages = self._need_pages(request)
        limit = min(self.allocator.max_pages_per_seq, self.allocator.num_pages)
        if pages > limit:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({request.max_new_tokens}) need {pages} "
                             f"pages of {self.allocator.page_size} tokens, more than the {limit} one request may hold")
        SamplingParams.make(1, request.temperature, request.top_k, request.top_p)
        request_seeds([request.seed], 1)

    def _need_pages(self, request: Request) -> int:
        """Worst-case pages: the prompt plus every emitted token but the last is cached, and a tree
        is cut to the budget left, so its rows never reach past that."""
        slots = len(request.prompt) + request.max_new_tokens - 1
        return -(-slots // self.allocator.page_size)

    def _outstanding(self) -> int:
        """Pages the running requests may still take, at worst."""
        return sum(run.need_pages - len(self.allocator.pages(run.rid)) for run in self._running.values())

    def _admit(self) -> None:
        """Move queued requests into free slots, in order, while the pool holds their worst case."""
        while self._queue and None in self._slots:
            rid, request = self._queue[0]
            cached = self.allocator.add(rid, request.prompt)  # maps a shared prefix's pages
            run = _Running(rid, request, self._slots.index(None), self._need_pages(request),
                           request.drafter or self.drafter, prefilled=cached, remaining=request.max_new_tokens)
            self._running[rid] = run
            if self._outstanding() > self.allocator.num_free:
                del self._running[rid]
                self.allocator.release(rid)
                return
            self._queue.popleft()
            self._slots[run.slot] = rid
            self._seeds[run.slot] = request.seed
            self._keys = None
            self.results[rid].status = "running"
            if run.drafter is not None:
                run.drafter.start_request(rid, list(request.prompt))

    def _decode_works(self, prefill_rows: int) -> tuple[list[Work], dict[int, float]]:
        """Each decoding slot's root + its drafter's tree, cut to max_tree and the budget left (and,
        with ``auto_tree``, to what pays for its rows); and per slot the kept nodes' claimed tokens."""
        decoding = [run for run in self._running.values() if run.decoding]
        proposals = [self._propose(run) for run in decoding]
        keep = [len(p) for p in proposals]
        probs = [np.clip(p.probs, 0.0, 1.0) for p in proposals]
        if self.policy is not None:
            gains = [p * self.policy.calibration(run.claimed, self.results[run.rid].accepted)
                     for run, p in zip(decoding, probs)]
            keep = self.policy.cut(len(decoding) + prefill_rows, len(decoding), gains)
        works, claims = [], {}
        for run, proposal, node_probs, n in zip(decoding, proposals, probs, keep):
            tokens, parents = proposal.tokens[:n].astype(np.int32), proposal.parents[:n].astype(np.int32)
            cached = self.allocator.length(run.rid)
            self.allocator.reserve(run.rid, cached + 1 + n)
            works.append(Work(run.slot, np.concatenate([[run.root], tokens]).astype(np.int32), parents, cached,
                              emits=True))
            claims[run.slot] = float(node_probs[:n].sum())
        return works, claims

    def _propose(self, run: _Running) -> Proposal:
        """The slot's drafter's tree within max_tree and the budget left (no nodes without a drafter)."""
        capacity = self.allocator.max_pages_per_seq * self.allocator.page_size
        budget = min(self.max_tree, run.remaining - 1, capacity - self.allocator.length(run.rid) - 1)
        if run.drafter is None or budget <= 0:
            return Proposal.empty()
        proposal = run.drafter.propose(run.rid, budget)
        check_proposals([proposal], run.drafter, budget, self.cfg.vocab_size)
        return proposal

    def _prefill_works(self) -> list[Work]:
        """Prompt chunks of the prefilling slots, in arrival order, up to prefill_budget rows in all."""
        works, budget = [], self.prefill_budget
        for run in self._running.values():
            prompt = run.request.prompt
            if run.decoding or budget == 0:
                continue
            end = min(len(prompt), run.prefilled + budget)
            self.allocator.reserve(run.rid, end)
            works.append(Work(run.slot, np.asarray(prompt[run.prefilled: end], np.int32), None, run.prefilled,
                              emits=end == len(prompt)))
            budget -= end - run.prefilled
        return works

    def _emit(self, run: _Running, emitted: list[int], drafts: int, hit_eos: bool) -> Event:
        result = self.results[run.rid]
        result.tokens.extend(emitted)
        result.passes += 1
        result.accepted += drafts
        run.root = emitted[-1]
        run.remaining -= len(emitted)
        finished = hit_eos or run.remaining <= 0
        if finished:
            self._retire(run)
            result.status = "finished"
        elif run.drafter is not None:
            run.drafter.observe(run.rid, emitted)
        return Event(run.rid, emitted, finished)

    def _retire(self, run: _Running) -> None:
        """Free a request's slot and pages and close its drafter's context."""
        del self._running[run.rid]
        self._slots[run.slot] = None
        self.allocator.release(run.rid)
        if run.drafter is not None:
            run.drafter.stop_request(run.rid)

    def _page_tables(self, slots: list[Optional[Hashable]]) -> np.ndarray:
        table = np.zeros((self.max_slots, self.allocator.max_pages_per_seq), np.int32)
        for slot, rid in enumerate(slots):
            if rid is not None:
                pages = self.allocator.pages(rid)
                table[slot, : len(pages)] = pages
        return table

    def _slot_keys(self) -> jax.Array:
        if self._keys is None:
            self._keys = request_keys(self._seeds)
        return self._keys

    def _sampling(self, running: list[Optional[_Running]]) -> SamplingParams:
        fields = [(r.request.temperature, r.request.top_k, r.request.top_p) if r is not None else (0.0, 0, 1.0)
                  for r in running]
        temperature, top_k, top_p = (np.array(column) for column in zip(*fields))
        return SamplingParams(temperature.astype(np.float32), top_k.astype(np.int32), top_p.astype(np.float32))
