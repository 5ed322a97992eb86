"""The public API: ``Engine(target, drafter).generate(prompts, ...)``.

The loop: prefill, then per step the host drafter proposes one tree per active
sequence, the fused ``step`` (verify + accept, one dispatch) keeps the longest
agreed path plus a bonus token, and the host reads back only the emitted
tokens to feed the drafter. Sequences in a batch accept different numbers of
tokens per step; finished ones ride along masked.

Shapes come from a few buckets (batch size, prompt width, cache length, tree
size), so a long-running engine compiles a handful of programs, not one per
request; ``warmup`` compiles them ahead and measures the step cost of each tree
size, which the ``"auto"`` capacity uses to pick T per step.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from specjax.drafters.base import HostDrafter, Proposal, attach_host_drafter, check_proposals
from specjax.drafters.device import is_device_drafter
from specjax.engine.autotune import (PIPELINE_MIN_DRAFT_SHARE, CapacityPolicy, capacity_buckets,
                                     expected_accepted, pipelined_round_pays)
from specjax.engine.buckets import MIN_CACHE_BUCKET, next_power_of_two, prompt_bucket
from specjax.engine.image_prompts import ImagePrompt, batch_input_embeds
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import PerRow, SamplingParams, request_keys, request_seeds
from specjax.engine.state import DecodeState
from specjax.engine.steps import PREFILL_CHUNK, Prefilled, extend, new_cache, prefill, step, token_logprobs
from specjax.engine.trace import TraceStep
from specjax.engine.tree import DraftTree, empty_tree, validate_tree
from specjax.models.chat import ChatInput, Message, conversations, encode_chat
from specjax.models.loading import Model
from specjax.models.sharding import DATA, cache_sharding, shard_model
from specjax.tpu_kernels.sharded_attention import sharded_tree_attention

Prompt = Union[str, Sequence[int]]
OnTokens = Callable[[int, list], None]  # (request index, newly accepted token ids)
AUTO = "auto"


@dataclasses.dataclass
class GenerationResult:
    """One request's output and what it cost.

    With ``stop`` strings, ``text`` ends before the first stop string while
    ``token_ids`` run through the token that completed it (as vLLM reports).
    ``trace``: one ``TraceStep`` per target pass after prefill (``specjax.engine.trace``).
    ``logprobs`` (with ``generate(logprobs=True)``): each token's log-probability under the
    distribution it was drawn from (``steps.token_logprobs``), one per ``token_ids``.
    """

    token_ids: list[int]
    text: Optional[str]
    target_passes: int  # prefill counts as one
    accepted_draft_tokens: int
    draft_s: float  # this request's share of host drafting time
    verify_s: float  # ... of device step time (verify + accept)
    wall_s: float
    read_s: float = 0.0  # ... of reading the emitted tokens back to the host
    trace: list[TraceStep] = dataclasses.field(default_factory=list)
    logprobs: Optional[list[float]] = None

    @property
    def tokens_per_pass(self) -> float:
        return len(self.token_ids) / max(self.target_passes, 1)

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per speculative pass (excludes prefill and bonus tokens)."""
        return self.accepted_draft_tokens / max(self.target_passes - 1, 1)


@dataclasses.dataclass
class Session:
    """One conversation whose KV cache the engine keeps between ``generate`` calls.

    A new prompt that extends what is cached (the previous prompt and reply,
    then the new turn) prefills only the new tokens; a prompt that diverges
    reuses the longest common prefix and prefills the rest. The reply's last
    token is never in the cache (it is the root of the next draft tree), so a
    follow-up turn prefills it with the new turn.
    """

    max_len: int
    cache: Optional[object] = None  # the KVCache, [layers, 1, kv_heads, max_len, head_dim]
    cached_ids: list = dataclasses.field(default_factory=list)
    prefilled_tokens: int = 0  # tokens run through prefill over the session's life

    def reusable_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` are already in the cache (always leaving one to run)."""
        limit = min(len(self.cached_ids), len(prompt) - 1)
        same = np.asarray(self.cached_ids[:limit]) == np.asarray(prompt[:limit])
        return int(limit if same.all() else np.argmin(same))


@dataclasses.dataclass(frozen=True)
class _PlainChunk:
    """A dispatched fused plain chunk (``device_loop.run_plain_chunk``) not yet read."""

    out: tuple  # (tokens[B, steps], emitted per row, logprobs or None, fused steps run), on the device
    active: np.ndarray  # the lane's rows still running when it was dispatched
    dispatched: float  # perf_counter at dispatch


@dataclasses.dataclass
class _Lane:
    """Rows of a batch that step together (one ``DecodeState``); two lanes ping-pong when pipelined."""

    rows: np.ndarray  # the batch rows this lane holds
    state: DecodeState
    policy: Optional[CapacityPolicy]
    device_finished: Optional[np.ndarray] = None
    # A dispatched step not yet read: (accepted, T, proposals, active, t, drafting s), or a _PlainChunk.
    in_flight: Optional[object] = None


class _Book:
    """Per-row outputs and costs of one batch, shared by its lanes."""

    def __init__(self, rows: int, n_requests: int, rids: list, on_tokens: Optional[OnTokens] = None,
                 first_index: int = 0, logprobs: bool = False):
        self.n_requests, self.rids = n_requests, rids
        self.on_tokens, self.first_index = on_tokens, first_index
        self.outputs: list[list[int]] = [[] for _ in range(rows)]
        # Accepted tokens reach the drafter only when it is next asked for a draft (or at the end):
        # while "auto" has drafting paused, the host does no per-step drafter work.
        self.unobserved: list[list[int]] = [[] for _ in range(rows)]
        self.finished = np.zeros(rows, bool)
        self.passes = np.ones(rows, np.int64)
        self.accepted = np.zeros(rows, np.int64)
        self.draft_s, self.verify_s, self.read_s = np.zeros(rows), np.zeros(rows), np.zeros(rows)
        self.traces: list[list[TraceStep]] = [[] for _ in range(rows)]
        self.logprobs: Optional[list[list[float]]] = [[] for _ in range(rows)] if logprobs else None

    def start(self, rows: np.ndarray, first: np.ndarray, finished: np.ndarray,
              first_logprobs: Optional[np.ndarray] = None) -> None:
        for j, i in enumerate(rows):
            self.emit(i, [int(first[j])])
            if self.logprobs is not None:
                self.logprobs[i].append(float(first_logprobs[j]))
        self.finished[rows] = finished | (rows >= self.n_requests)

    def emit(self, row: int, tokens: list[int]) -> None:
        """Book a row's newly accepted tokens and stream them to ``on_tokens`` (real requests only)."""
        self.outputs[row].extend(tokens)
        self.unobserved[row].extend(tokens)
        if self.on_tokens is not None and row < self.n_requests:
            self.on_tokens(self.first_index + int(row), tokens)


def check_scratch_headroom(max_len: int, longest: int, capacity: int) -> None:
    """Refuse a cache that cannot hold the last step's tree above ``longest`` tokens.

    Verify writes T + 1 rows above the cached tokens; rows past the cache's end would be
    dropped on write and clamped on read, and compaction would copy stale K/V into live slots.
    """
    if longest + capacity + 1 > max_len:
        raise ValueError(f"cache of {max_len} slots < {longest} tokens + draft scratch ({capacity + 1})")


class Engine:
    """Speculative decoding with a target model and a host drafter (or none).

    Args:
      target: the loaded target ``Model``, or a ``VisionLanguageModel`` (``load_vlm``): its text model
        decodes, and ``generate(images=...)`` feeds the images into the prefill.
      drafter: a ``HostDrafter`` (prompt lookup, suffix index, ...), a
        ``DeviceDrafter`` (draft model, EAGLE-3, Token Recycling: the whole loop
        then runs on the device, see ``specjax.engine.device_loop``), or None for
        plain decoding through the same loop (one token per pass).
      draft_capacity: T, the tree slots per sequence and step. ``"auto"`` (the
        default) picks T per step among 0, 1, 2, 4, ... up to
        ``max_draft_capacity`` from measured step costs and the drafter's
        calibrated confidence: T = 0 (a plain step) whenever drafts do not pay.
        An int fixes T for every step.
      max_draft_capacity: the largest T ``"auto"`` may pick.
      attention: "auto" | "xla" | "pallas" (see ``specjax.tpu_kernels``); on a mesh it runs
        under ``shard_map`` over the heads (``sharded_tree_attention``).
      max_batch_size: prompts are processed in batches of at most this size.
      mesh: a ("data", "model") ``jax.sharding.Mesh``: the target is tensor-parallel
        over "model" (see ``specjax.models.sharding``), the batch split over "data".
      prefill_chunk: prompts longer than this prefill in chunks of this many tokens.
      pipeline: split each batch into two lanes that ping-pong, so host drafting for one overlaps
        the other's device step. ``"auto"`` (default) does it for a batch on a TPU/GPU when the
        measured drafting time and step costs say it pays (drafting comparable to a step; never on
        a CPU, whose steps run on the drafting cores); True / False force it.
      share_drafter_state: let a host drafter that learns across requests (the suffix index) serve
        this Engine after another one, keeping what it learned there; without it that raises (see
        ``specjax.drafters.base.HostDrafter``). Every proposal is checked (``check_proposals``).
      lazy_compile: with ``"auto"``, compile a tree size when the policy first picks it (a
        first call pays only for the sizes it uses); False compiles every size when a batch
        shape is first seen, so later calls never compile (benchmarks that time them).
      shrink_batches: in the on-device loop (device drafters, and plain decoding without a
        drafter), once half of a batch's rows have finished, run the rest as a batch of the next
        power of two above their count (``device_loop.live_rows``): a batch's long tail rows
        stop paying for the finished ones' compute. Each smaller batch compiles its own programs.
    """

    def __init__(self, target: Model, drafter: Optional[HostDrafter] = None, *,
                 draft_capacity: Union[int, str] = AUTO, max_draft_capacity: int = 16, attention: str = "auto",
                 max_batch_size: int = 16, mesh: Optional[Mesh] = None, prefill_chunk: int = PREFILL_CHUNK,
                 pipeline: Union[bool, str] = AUTO, share_drafter_state: bool = False, lazy_compile: bool = True,
                 shrink_batches: bool = True):
        if draft_capacity != AUTO and (not isinstance(draft_capacity, int) or draft_capacity < 0):
            raise ValueError(f"draft_capacity must be 'auto' or an int >= 0, got {draft_capacity!r}")
        if max_draft_capacity < 1:
            raise ValueError(f"max_draft_capacity must be >= 1, got {max_draft_capacity}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
        if pipeline not in (True, False, AUTO):
            raise ValueError(f"pipeline must be True, False or 'auto', got {pipeline!r}")
        # A vision-language model: its text model decodes; its tower and projector embed the images.
        self.vision = target if hasattr(target, "text_model") else None
        target = target.text_model() if self.vision is not None else target
        if mesh is not None:  # heads padded to the model axis; attention under shard_map over heads
            params, cfg = shard_model(target.params, target.config, mesh)
            target = dataclasses.replace(target, params=params, config=cfg)
            if isinstance(attention, str):
                attention = sharded_tree_attention(mesh, attention)
        self.mesh = mesh
        self.target = target
        self.drafter = drafter
        self.on_device = is_device_drafter(drafter)
        if drafter is not None and not self.on_device and not hasattr(drafter, "generate_hybrid"):
            attach_host_drafter(drafter, self, share_state=share_drafter_state)
        self.auto = drafter is not None and not self.on_device and draft_capacity == AUTO
        # A device drafter's tree is its own; "auto" picks a size per chunk among buckets up to this.
        self.device_auto = self.on_device and draft_capacity == AUTO
        self.max_draft_capacity = max_draft_capacity
        if drafter is None or self.on_device:  # a device drafter's tree size is its own
            self.capacity = 0
        else:
            self.capacity = max_draft_capacity if self.auto else int(draft_capacity)
        self.attention = attention
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self._request_ids = itertools.count()
        self._step_costs: dict[tuple[int, int], dict[int, float]] = {}
        self._calibration = 1.0  # the drafter's accepted / claimed tokens, carried across batches
        self._fused_plain_s: dict[tuple[int, int], float] = {}  # per (rows, cache slots), across batches
        self._plain_chunks_compiled: set = set()
        self.pipeline = pipeline
        self.lazy_compile = lazy_compile
        self.shrink_batches = shrink_batches
        self._draft_s_per_row: Optional[float] = None  # running host drafting seconds per drafted row
        self._steps_share_host_cores = jax.default_backend() == "cpu"  # then overlap is not free

    @classmethod
    def from_pretrained(cls, model: Union[str, Model], drafter=None, *, max_draft: Optional[int] = None,
                        speculative_config=None, dtype="auto", **engine_kwargs) -> "Engine":
        """An Engine in one line: ``Engine.from_pretrained("smollm2-135m-instruct")``.

        ``model``: a directory, ``.gguf`` file, registry name or ``hf:Org/Repo`` (``load_model``, with
        ``dtype``), or a loaded ``Model``. ``drafter``: a ``load_drafter`` name (default
        "prompt-lookup") or a drafter object; ``max_draft`` the largest tree per step (default
        ``default_max_capacity()``: 8 on a CPU, 16 on a TPU/GPU). Or, instead of both, a
        ``speculative_config`` (``SpecConfig`` or vLLM's dict). Other keywords go to ``Engine``.
        """
        from specjax.engine.spec_config import pretrained_parts

        target, drafter, kwargs = pretrained_parts(model, drafter, max_draft=max_draft, dtype=dtype,
                                                   speculative_config=speculative_config,
                                                   engine_kwargs=engine_kwargs)
        return cls(target, drafter, **kwargs)

    # ------------------------------------------------------------ text

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, ImagePrompt):  # already ids, with the embeddings its prefill feeds
            return prompt
        if isinstance(prompt, str):
            if self.target.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return list(self.target.tokenizer.encode(prompt).ids)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """One conversation as prompt ids (``specjax.models.chat.encode_chat``)."""
        return encode_chat(self.target, messages)

    def decode(self, ids: Sequence[int]) -> Optional[str]:
        return None if self.target.tokenizer is None else self.target.tokenizer.decode(list(ids))

    # ------------------------------------------------------------ buckets

    @property
    def tree_sizes(self) -> tuple[int, ...]:
        """The tree capacities this engine compiles a step for."""
        return capacity_buckets(self.capacity) if self.auto else (self.capacity,)

    def batch_bucket(self, n: int) -> int:
        """Rows per compiled batch: a power of two (at most max_batch_size's), times the data axis."""
        rows = min(next_power_of_two(n), next_power_of_two(self.max_batch_size))
        if self.mesh is not None:
            data = self.mesh.shape[DATA]
            rows = -(-rows // data) * data
        return rows

    def prompt_bucket(self, longest: int) -> int:
        """Padded prompt width for this engine's prefill chunk (``specjax.engine.buckets.prompt_bucket``)."""
        return prompt_bucket(longest, self.prefill_chunk)

    def cache_bucket(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache slots: a power of two covering the longest real prompt, budget and one tree's scratch rows
        (it also covers the padded prompt width: see ``prompt_bucket``)."""
        longest = prompt_len + max_new_tokens
        limit = self.target.config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings ({limit})")
        return next_power_of_two(longest + self.capacity + 1, MIN_CACHE_BUCKET)

    # ------------------------------------------------------------ warmup

    def warmup(self, batch_size: int = 1, prompt_len: int = 1, max_new_tokens: int = 128,
               timing_steps: int = 3, sizes: Optional[Sequence[int]] = None) -> dict:
        """Compile prefill, every tree size's step (or only ``sizes``'; with "auto" the others compile
        on first use) and, for "auto", the fused plain chunk for one shape bucket; measure step costs.

        Returns {"bucket": (rows, prompt width, cache slots), "compile_s": {name: seconds},
        "step_s": {T: seconds per step}}. The step costs feed ``draft_capacity="auto"``.
        """
        rows, width = self.batch_bucket(batch_size), self.prompt_bucket(prompt_len)
        max_len = self.cache_bucket(prompt_len, max_new_tokens)
        t0 = time.perf_counter()
        state = self._prefill([[0]] * rows, width, max_len, max_new_tokens, SamplingParams.make(rows),
                              seeds=np.zeros(rows, np.int64)).state
        jax.block_until_ready(state)
        compile_s = {"prefill": time.perf_counter() - t0}
        first_calls, state = self._measure_step_costs(state, timing_steps, sizes=sizes)
        compile_s.update({f"step T={t}": s for t, s in first_calls.items()})
        if self.auto:  # the plain chunks fused while drafting is paused
            t0 = time.perf_counter()
            self._compile_plain_chunk(state, logprobs=False)
            compile_s["plain chunk"] = time.perf_counter() - t0
        return {"bucket": (rows, width, max_len), "compile_s": compile_s,
                "step_s": dict(self._step_costs[(rows, max_len)])}

    # ------------------------------------------------------------ generate

    def session(self, max_len: int = 8192) -> Session:
        """A multi-turn session holding up to ``max_len`` tokens of context in its KV cache."""
        limit = self.target.config.max_position_embeddings
        if not 1 < max_len <= limit:
            raise ValueError(f"session max_len must be in (1, {limit}] (the model's max_position_embeddings), "
                             f"got {max_len}")
        return Session(max_len=next_power_of_two(max_len, MIN_CACHE_BUCKET))

    def generate(self, prompts: Optional[Sequence[Prompt]] = None, max_new_tokens: int = 128, *,
                 messages: Optional[ChatInput] = None, temperature: PerRow = 0.0, top_p: PerRow = 1.0,
                 top_k: PerRow = 0, seed: Union[int, Sequence[int]] = 0, stop: Sequence[str] = (), progress=None,
                 session: Optional[Session] = None, on_tokens: Optional[OnTokens] = None,
                 logprobs: bool = False, images: Optional[Sequence] = None) -> list[GenerationResult]:
        """Generate for every prompt; greedy output equals plain greedy decoding exactly.

        ``temperature``, ``top_p`` and ``top_k`` are scalars or one value per
        prompt (runtime values: changing them never recompiles). ``stop``
        strings end a request once its decoded text contains one (``text`` is
        cut before it). ``progress`` is an optional tqdm-like object whose
        ``update(n)`` is called with the number of new tokens. With a ``session``
        (see ``Engine.session``), one prompt at a time continues that conversation. Without a
        drafter, plain steps run fused in the on-device loop (``device_loop.NoDrafter``: no
        per-step dispatch), except with a session or ``on_tokens``, which step in the host loop.

        ``seed``: prompt i samples with seed ``seed + i``, or ``seed[i]`` for a sequence. Each token is
        drawn with the noise of its request's seed and its position, so a request and seed give the
        same tokens alone or in any batch, on a fresh or a used engine, with any drafter, and the
        tokens ``generate_plain`` samples (see "Seeds" in the README).

        ``messages`` replaces ``prompts`` for chat models: one conversation (a list of
        ``{"role", "content"}`` dicts) or a list of them, rendered with the target's chat template
        (``specjax.models.chat.render_chat``, ending with the assistant header) and tokenized without
        adding special tokens, as ``apply_chat_template`` does.

        ``on_tokens(request_index, new_token_ids)`` streams: the host loop calls it for each request
        with the tokens every step accepts (the first one from prefill); device and hybrid drafters'
        loops sync with the host less often, so there it is called once per request with the whole
        output. Without stop strings the chunks concatenate to the result's ``token_ids``; with them
        the last chunk may run past the cut.

        ``logprobs=True`` fills each result's ``logprobs``: the target's log-probability of every
        emitted token under the distribution it was drawn from (greedy rows: the log-softmax of the
        raw logits; sampled rows: of ``sampling.target_probs``, temperature, top-k and top-p
        applied), gathered on the device inside the step (a separate compiled step; the default
        one is unchanged). Every result carries a per-pass ``trace`` (``specjax.engine.trace``).

        ``images`` (an Engine over a vision-language model, ``load_vlm``): one entry per prompt, an
        image (PIL or an HWC array), a list of them, or None. A prompt's image placeholder tokens are
        expanded to the image's tokens, or the image tokens go first when it has none; the image
        features enter the prefill (``models.multimodal.encode_image_prompts``), and decoding is the
        text model's, so every drafter stays lossless.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if (prompts is None) == (messages is None):
            raise ValueError("pass either prompts or messages (chat conversations), not both or neither")
        encoded = [self.encode(p) for p in prompts] if messages is None else [
            self.encode_chat(conversation) for conversation in conversations(messages)]
        if session is not None and len(encoded) != 1:
            raise ValueError(f"a session continues one conversation: pass one prompt, got {len(encoded)}")
        if images is not None:
            encoded = self._with_images(encoded, images, session)
        seed = request_seeds(seed, len(encoded))  # request i's seed: seed + i, or seed[i] (see "Seeds")
        if hasattr(self.drafter, "generate_hybrid"):  # Graft: device drafter + host retrieval, its own loop
            if session is not None:
                raise ValueError("sessions run with host drafters (or none); this engine has a hybrid drafter")
            return _stream_whole(on_tokens, self.drafter.generate_hybrid(
                self, encoded, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                stop=stop, progress=progress, logprobs=logprobs))
        fused_plain = self.drafter is None and session is None and on_tokens is None
        if self.on_device or fused_plain:  # draft -> verify -> accept -> drafter update, N steps per host sync
            if session is not None:
                raise ValueError("sessions run with host drafters (or none); this engine has a device drafter")
            from specjax.engine.device_loop import NoDrafter, generate_on_device

            return _stream_whole(on_tokens, generate_on_device(
                self, encoded, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                stop=stop, progress=progress, auto=self.device_auto, max_capacity=self.max_draft_capacity,
                logprobs=logprobs, drafter=NoDrafter() if fused_plain else None))
        sampling = _per_prompt(SamplingParams.make(len(encoded), temperature, top_k, top_p))
        results: list[GenerationResult] = []
        for start in range(0, len(encoded), self.max_batch_size):
            end = start + self.max_batch_size
            results.extend(self._generate_batch(encoded[start:end], max_new_tokens,
                                                {k: v[start:end] for k, v in sampling.items()},
                                                seed[start:end], tuple(stop), progress, session, on_tokens,
                                                start, logprobs))
        return results

    def _with_images(self, encoded: list, images: Sequence, session: Optional[Session]) -> list:
        """The prompts as ``ImagePrompt``s: image tokens expanded, embeddings with the image features."""
        from specjax.models.multimodal import encode_image_prompts

        if self.vision is None:
            raise ValueError("images need an Engine over a vision-language model (load_vlm); this target is "
                             "text only")
        if session is not None:
            raise ValueError("sessions hold text turns; pass images without a session")
        ids, embeds = encode_image_prompts(self.vision, encoded, images)
        return [ImagePrompt(i, e) for i, e in zip(ids, embeds)]

    def _continue_session(self, session: Session, prompt: list, max_new_tokens: int, sampling: SamplingParams,
                          seeds: np.ndarray, return_logits: bool = False) -> Prefilled:
        """Prefill only the part of ``prompt`` the session has not cached."""
        cfg = self.target.config
        reused = session.reusable_prefix(prompt)
        new = prompt[reused:]
        needed = len(prompt) + max_new_tokens + self.capacity + 1
        if needed > session.max_len:
            raise ValueError(f"session cache overflow: {len(prompt)} prompt tokens + max_new_tokens "
                             f"({max_new_tokens}) + draft scratch ({self.capacity + 1}) = {needed} > the "
                             f"session's {session.max_len} slots; start a new session with a larger max_len")
        tokens, lengths = pad_prompts([new], cfg.vocab_size, multiple=1)
        width = self.prompt_bucket(len(new))
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
        cache = session.cache
        if cache is None:
            sharding = None if self.mesh is None else cache_sharding(cfg, self.mesh, 1)
            cache = new_cache(cfg, 1, session.max_len, self.target.params["embed"].dtype, sharding)
        session.cache = None  # donated to the steps; stored back when the reply is done
        session.prefilled_tokens += len(new)
        return extend(self.target.params, cfg, cache, np.asarray([reused], np.int32), tokens, lengths,
                      np.asarray([max_new_tokens], np.int32), request_keys(seeds), sampling,
                      attention=self.attention, chunk=self.prefill_chunk,
                      return_logits=return_logits)  # numpy: checked without a sync

    def _prefill(self, prompts, width, max_len, max_new_tokens, sampling: SamplingParams, seeds: np.ndarray,
                 return_logits: bool = False) -> Prefilled:
        cfg = self.target.config
        tokens, lengths = pad_prompts(prompts, cfg.vocab_size, multiple=1)
        tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
        sharding = None if self.mesh is None else cache_sharding(cfg, self.mesh, len(prompts))
        return prefill(self.target.params, cfg, tokens, lengths, np.full(len(prompts), max_new_tokens, np.int32),
                       request_keys(seeds), sampling, max_len=max_len, attention=self.attention,
                       cache_sharding=sharding, chunk=self.prefill_chunk, return_logits=return_logits,
                       input_embeds=batch_input_embeds(prompts, width))  # numpy: checked without a sync

    def _generate_batch(self, prompts, max_new_tokens, sampling: dict, seeds: np.ndarray, stop, progress,
                        session: Optional[Session] = None, on_tokens: Optional[OnTokens] = None,
                        first_index: int = 0, logprobs: bool = False):
        t0 = time.perf_counter()
        n_requests = len(prompts)
        rows = 1 if session is not None else self.batch_bucket(n_requests)
        padded = list(prompts) + [prompts[-1]] * (rows - n_requests)  # padding rows finish at once
        seeds = np.pad(seeds, (0, rows - n_requests), mode="edge")
        sampling = SamplingParams.make(rows, *(np.pad(sampling[k], (0, rows - n_requests), mode="edge")
                                               for k in ("temperature", "top_k", "top_p")))
        longest = max(len(p) for p in prompts)
        width = self.prompt_bucket(longest)
        max_len = session.max_len if session is not None else self.cache_bucket(longest, max_new_tokens)
        if session is None:
            check_scratch_headroom(max_len, longest + max_new_tokens, self.capacity)
        lanes = self._lanes(rows, max_len) if session is None else [np.arange(1)]
        book = _Book(rows, n_requests, [next(self._request_ids) for _ in range(rows)], on_tokens, first_index,
                     logprobs)
        running = []
        for lane_rows in lanes:
            lane_sampling = jax.tree_util.tree_map(lambda a: a[lane_rows], sampling)
            if session is None:
                out = self._prefill([padded[i] for i in lane_rows], width, max_len, max_new_tokens,
                                    lane_sampling, seeds[lane_rows], return_logits=logprobs)
            else:
                out = self._continue_session(session, prompts[0], max_new_tokens, lane_sampling, seeds,
                                             return_logits=logprobs)
            state, first = out.state, out.first_tokens
            first_logprobs = None if out.logits is None else token_logprobs(out.logits, first, lane_sampling)
            book.start(lane_rows, np.asarray(first), np.asarray(state.finished), first_logprobs)
            if self.auto and (len(lane_rows), max_len) not in self._step_costs:  # lazily: trees on first use
                sizes = (0,) if self.lazy_compile else None
                state = self._measure_step_costs(state, sizes=sizes)[1]  # on the live state: no second cache
            if self.auto and not self.lazy_compile:  # the paused drafter's fused plain chunks too
                state = self._compile_plain_chunk(state, logprobs)
            policy = self._policy(len(lane_rows), max_len) if self.auto else None
            running.append(_Lane(lane_rows, state, policy, np.asarray(state.finished)))
        if self.drafter is not None:
            for rid, prompt in zip(book.rids[:n_requests], prompts):
                self.drafter.start_request(rid, prompt)
        book.finished |= self.stop_string_hits(book.outputs, stop)
        report_progress(progress, n_requests)
        # Serial: draft -> step -> read, per step. Two lanes ping-pong: while one lane's step runs on
        # the device, the host reads the other lane's tokens and drafts its next tree.
        while not book.finished.all():
            for lane in running:
                if lane.in_flight is not None:
                    self._collect(lane, book, stop, progress)
                if not book.finished[lane.rows].all():
                    self._dispatch(lane, book)
        self._finish_drafting(book)
        for lane in running:
            if lane.policy is not None:
                self._calibration = lane.policy.calibration
                if lane.policy.fused_plain_s is not None:
                    self._fused_plain_s[(len(lane.rows), max_len)] = lane.policy.fused_plain_s
        if session is not None:
            session.cache = running[0].state.cache
            session.cached_ids = (list(prompts[0]) + book.outputs[0])[: int(running[0].state.lengths[0])]
        wall = time.perf_counter() - t0
        outputs = book.outputs[:n_requests]
        texts = [self.decode(out) for out in outputs]
        outputs, texts = self.cut_stops(outputs, texts, stop)
        return [GenerationResult(out, text, int(book.passes[i]), int(book.accepted[i]), float(book.draft_s[i]),
                                 float(book.verify_s[i]), wall, float(book.read_s[i]), book.traces[i],
                                 None if book.logprobs is None else book.logprobs[i][: len(out)])
                for i, (out, text) in enumerate(zip(outputs, texts))]

    # ------------------------------------------------------------ the step loop

    def _lanes(self, rows: int, max_len: int) -> list[np.ndarray]:
        """The batch's rows as one lane, or as two halves that ping-pong when that is expected to pay."""
        if self.pipeline is False or self.drafter is None or self.capacity == 0 or rows < 2:
            return [np.arange(rows)]
        half = rows // 2
        if self.mesh is not None and half % self.mesh.shape[DATA]:
            return [np.arange(rows)]
        if self.pipeline == AUTO and not self._pipeline_pays(rows, max_len):
            return [np.arange(rows)]
        return [np.arange(half), np.arange(half, rows)]

    def _pipeline_pays(self, rows: int, max_len: int) -> bool:
        """Two half-batch lanes beat one batch by the measured costs (see ``pipelined_round_pays``)."""
        if self._steps_share_host_cores or self._draft_s_per_row is None:
            return False  # CPU steps run on the drafting cores; nothing measured yet (first batch): serial
        drafting = self._draft_s_per_row * rows
        t = self.capacity if not self.auto else capacity_buckets(self.capacity)[1]
        if t not in self._step_costs.get((rows, max_len), {}):  # before this batch's prefill: one cache at a time
            self._measure_step_costs(self._scratch_state(rows, max_len), sizes=(0, t))
        full = self._step_costs[(rows, max_len)][t]
        if drafting < PIPELINE_MIN_DRAFT_SHARE * full:  # cannot pay: spare the half-batch compiles
            return False
        if t not in self._step_costs.get((rows // 2, max_len), {}):
            self._measure_step_costs(self._scratch_state(rows // 2, max_len), sizes=(0, t))
        return pipelined_round_pays(full, self._step_costs[(rows // 2, max_len)][t], drafting)

    def _dispatch(self, lane: "_Lane", book: "_Book") -> None:
        """Draft this lane's trees and launch its step; the results are read by ``_collect``. While
        "auto" has drafting paused, the plain steps before the next probe run fused instead."""
        finished = book.finished[lane.rows]
        if (finished != lane.device_finished).any():  # stop strings end rows the device doesn't know of
            lane.state = lane.state.replace(finished=jnp.asarray(finished))
        if lane.policy is not None and lane.policy.plain_steps_ahead() > 0:
            self._dispatch_plain_chunk(lane, book)
            return
        active = ~finished
        d0 = time.perf_counter()
        proposals = self._propose(book.rids, lane.rows, active, lane.policy, book.unobserved)
        capacity = self._choose_capacity(proposals, active, lane.policy)
        tree = self._pack(proposals, len(lane.rows), capacity)
        d1 = time.perf_counter()
        if lane.policy is not None and capacity not in lane.policy.costs:  # first use: compile, time it
            lane.state = self._measure_step_costs(lane.state, sizes=(capacity,))[1]
        cfg = self.target.config
        lane.state, acc = step(self.target.params, lane.state, tree, cfg=cfg, attention=self.attention,
                               eos_ids=cfg.eos_token_ids, logprobs=book.logprobs is not None)
        lane.in_flight = (acc, capacity, proposals, active, d1, d1 - d0)
        drafted = [p for p in proposals if p is not None]
        if drafted and lane.policy is not None:
            lane.policy.record_drafting(d1 - d0)  # speculation's host cost, in the policy's cost model
        if drafted:
            per_row = (d1 - d0) / len(drafted)
            self._draft_s_per_row = per_row if self._draft_s_per_row is None else (
                0.8 * self._draft_s_per_row + 0.2 * per_row)
        share = active / active.sum()
        book.draft_s[lane.rows] += (d1 - d0) * share

    def _dispatch_plain_chunk(self, lane: "_Lane", book: "_Book") -> None:
        """Launch the plain steps before the drafter's next probe as one fused on-device chunk
        (``device_loop.run_plain_chunk``): no per-token dispatch and sync while drafting is paused."""
        from specjax.engine.device_loop import PLAIN_CHUNK_STEPS, run_plain_chunk

        steps = min(lane.policy.plain_steps_ahead(), PLAIN_CHUNK_STEPS)
        lane.state = self._compile_plain_chunk(lane.state, book.logprobs is not None)
        dispatched = time.perf_counter()
        lane.state, out = run_plain_chunk(self.target.params, lane.state, steps, cfg=self.target.config,
                                          attention=self.attention, logprobs=book.logprobs is not None)
        lane.in_flight = _PlainChunk(out, ~book.finished[lane.rows], dispatched)

    def _compile_plain_chunk(self, state: DecodeState, logprobs: bool) -> DecodeState:
        """Compile the fused plain chunk for this state's shape once, outside any timing (a zero-step call)."""
        from specjax.engine.device_loop import run_plain_chunk

        key = (state.lengths.shape[0], state.cache.k.shape[3], logprobs)
        if key in self._plain_chunks_compiled:
            return state
        self._plain_chunks_compiled.add(key)
        state = run_plain_chunk(self.target.params, state, 0, cfg=self.target.config, attention=self.attention,
                                logprobs=logprobs)[0]
        return jax.block_until_ready(state)

    def _collect_plain_chunk(self, lane: "_Lane", book: "_Book", progress) -> None:
        """Book a fused plain chunk's tokens (one per pass) and its time per step."""
        chunk, lane.in_flight = lane.in_flight, None
        (tokens, num, logprobs, steps), lane.device_finished = jax.device_get((chunk.out, lane.state.finished))
        seconds = time.perf_counter() - chunk.dispatched
        lane.policy.record_plain_chunk(seconds, int(steps))
        per_step = seconds / max(int(steps), 1)
        share = chunk.active / chunk.active.sum()
        book.verify_s[lane.rows] += seconds * share
        for j in np.flatnonzero(chunk.active):
            i, n = lane.rows[j], int(num[j])
            book.emit(i, tokens[j, :n].tolist())
            book.passes[i] += n  # a plain pass emits one token
            book.traces[i].extend(TraceStep(0, 0, 0, 1, 0.0, per_step) for _ in range(n))
            if logprobs is not None:
                book.logprobs[i].extend(logprobs[j, :n].tolist())
        report_progress(progress, int(num[lane.rows < book.n_requests].sum()))

    def _collect(self, lane: "_Lane", book: "_Book", stop, progress) -> None:
        """Wait for the lane's step (or fused plain chunk), read back only the emitted tokens, book them,
        and mark the rows that finished (on the device, or by a stop string)."""
        if isinstance(lane.in_flight, _PlainChunk):
            self._collect_plain_chunk(lane, book, progress)
        else:
            self._collect_step(lane, book, progress)
        book.finished[lane.rows] = lane.device_finished | self.stop_string_hits(
            [book.outputs[i] for i in lane.rows], stop)

    def _collect_step(self, lane: "_Lane", book: "_Book", progress) -> None:
        """Book a speculative (or plain) step's emitted tokens, its costs and the policy's record."""
        acc, capacity, proposals, active, dispatched, drafting = lane.in_flight
        lane.in_flight = None
        jax.block_until_ready(acc.num)
        d2 = time.perf_counter()
        emitted, num, n_draft, lane.device_finished, logprobs = jax.device_get(
            (acc.tokens, acc.num, acc.num_draft_accepted, lane.state.finished, acc.logprobs))
        d3 = time.perf_counter()
        if lane.policy is not None:
            lane.policy.record(capacity, d3 - dispatched, expected_accepted(_probs(proposals), capacity),
                               int(n_draft.sum()))
        share = active / active.sum()
        book.verify_s[lane.rows] += (d2 - dispatched) * share
        book.read_s[lane.rows] += (d3 - d2) * share
        for j in np.flatnonzero(active):
            i = lane.rows[j]
            book.emit(i, emitted[j, : num[j]].tolist())
            book.passes[i] += 1
            book.accepted[i] += n_draft[j]
            drafted = 0 if proposals[j] is None else min(len(proposals[j]), capacity)
            book.traces[i].append(TraceStep(capacity, drafted, int(n_draft[j]), int(num[j]),
                                            float(drafting * share[j]), d2 - dispatched))
            if logprobs is not None:
                book.logprobs[i].extend(logprobs[j, : num[j]].tolist())
        report_progress(progress, int(num[lane.rows < book.n_requests].sum()))

    def _finish_drafting(self, book: "_Book") -> None:
        """Hand the drafter the last tokens of each request and end it."""
        if self.drafter is None:
            return
        for i, rid in enumerate(book.rids[: book.n_requests]):
            self._observe(rid, book.unobserved[i])
            self.drafter.stop_request(rid)

    # ------------------------------------------------------------ drafting

    def _policy(self, rows: int, max_len: int) -> CapacityPolicy:
        """A per-batch policy over this bucket's step costs (the plain step's measured already, the
        trees' as the policy reaches them; its running updates stay with the engine) and the
        drafter's calibration so far."""
        return CapacityPolicy(costs=self._step_costs[(rows, max_len)], sizes=self.tree_sizes,
                              calibration=self._calibration,
                              draft_s=(self._draft_s_per_row or 0.0) * rows,
                              fused_plain_s=self._fused_plain_s.get((rows, max_len)))

    def _scratch_state(self, rows: int, max_len: int) -> DecodeState:
        """An empty state of this bucket, to time steps before a batch has a state of its own."""
        cfg = self.target.config
        sharding = None if self.mesh is None else cache_sharding(cfg, self.mesh, rows)
        return DecodeState(cache=new_cache(cfg, rows, max_len, self.target.params["embed"].dtype, sharding),
                           lengths=jnp.zeros(rows, jnp.int32), last_tokens=jnp.zeros(rows, jnp.int32),
                           remaining=jnp.full(rows, max_len, jnp.int32), finished=jnp.zeros(rows, bool),
                           rng=request_keys(np.zeros(rows, np.int64)), sampling=SamplingParams.make(rows),
                           eos_ids=cfg.eos_token_ids)  # as prefill's states: the same compiled step

    def _measure_step_costs(self, state: DecodeState, timing_steps: int = 3,
                            sizes: Optional[Sequence[int]] = None) -> tuple[dict[int, float], DecodeState]:
        """Time each tree size's step (``sizes``, default all) on ``state`` (a live one: no second KV
        cache); return it unchanged.

        The timed steps see every row finished, so they emit nothing and leave lengths, tokens and
        budgets alone; they write K/V only above the cached tokens (where the next step writes
        anyway), from the middle of the cache where the rows are shorter. The rows' finished flags
        are put back. Records the median of ``timing_steps`` runs per size under
        (rows, cache slots) and returns the first call's time per size (compilation, unless already
        compiled) with the state.
        """
        cfg, params = self.target.config, self.target.params
        rows, max_len = state.lengths.shape[0], state.cache.k.shape[3]
        live = (state.lengths, state.finished)  # never passed to a step, so never donated
        sizes = self.tree_sizes if sizes is None else tuple(sizes)
        middle = min(max_len // 2, max_len - max(sizes) - 1)
        state = state.replace(lengths=jnp.maximum(state.lengths, middle), finished=jnp.ones(rows, bool))
        costs, first_calls = {}, {}
        for t in sizes:
            tree = empty_tree(rows, t)  # host arrays and the loop's eos_ids: the very program the loop runs
            times = []
            for _ in range(timing_steps + 1):
                t0 = time.perf_counter()  # timed as the generation loop times a step
                state, acc = step(params, state, tree, cfg=cfg, attention=self.attention, eos_ids=cfg.eos_token_ids,
                                  logprobs=False)
                jax.block_until_ready(acc.num)
                jax.device_get((acc.tokens, acc.num, acc.num_draft_accepted, state.finished))
                times.append(time.perf_counter() - t0)
            costs[t], first_calls[t] = float(np.median(times[1:])), times[0]
        self._step_costs.setdefault((rows, max_len), {}).update(costs)  # the same dict as its policies'
        return first_calls, state.replace(lengths=live[0], finished=live[1])

    def _propose(self, rids, rows: np.ndarray, active, policy: Optional[CapacityPolicy],
                 unobserved) -> list[Optional[Proposal]]:
        """Each active lane row's proposal (None for rows not drafted this step)."""
        proposals: list[Optional[Proposal]] = [None] * len(rows)
        if self.drafter is None or self.capacity == 0 or (policy is not None and not policy.should_draft()):
            return proposals
        drafted = np.flatnonzero(active)
        for j in drafted:
            i = rows[j]
            self._observe(rids[i], unobserved[i])
            proposals[j] = self.drafter.propose(rids[i], self.capacity)
        check_proposals([proposals[j] for j in drafted], self.drafter, self.capacity, self.target.config.vocab_size)
        return proposals

    def _observe(self, rid, tokens: list) -> None:
        """Hand the drafter the tokens accepted since it last saw this request."""
        if tokens and self.drafter is not None:
            self.drafter.observe(rid, tokens)
            tokens.clear()

    def _choose_capacity(self, proposals, active, policy: Optional[CapacityPolicy]) -> int:
        if policy is None:
            return self.capacity
        if all(p is None for p in proposals):  # the policy did not ask the drafter: a plain step
            return 0
        return policy.choose(_probs(proposals), int(active.sum()))

    def _pack(self, proposals, rows: int, capacity: int) -> DraftTree:
        """The (checked) proposals truncated to ``capacity`` nodes (best-first order keeps the best ones)."""
        tokens = np.zeros((rows, capacity), np.int32)
        parents = np.full((rows, capacity), -1, np.int32)
        valid = np.zeros((rows, capacity), bool)
        for i, prop in enumerate(proposals):
            if prop is None or capacity == 0:
                continue
            n = min(len(prop), capacity)
            tokens[i, :n], parents[i, :n], valid[i, :n] = prop.tokens[:n], prop.parents[:n], True
        tree = DraftTree(tokens, parents, valid)
        validate_tree(tree, self.target.config.vocab_size)
        return tree

    # ------------------------------------------------------------ stops

    def stop_string_hits(self, outputs: Sequence[Sequence[int]], stop: Sequence[str]) -> np.ndarray:
        """[N] bool: which outputs' text contains one of the ``stop`` strings (none without a tokenizer)."""
        if not stop or self.target.tokenizer is None:
            return np.zeros(len(outputs), bool)
        return np.array([any(s in self.decode(o) for s in stop) for o in outputs])

    def cut_stops(self, outputs: list, texts: list, stop: Sequence[str]) -> tuple[list, list]:
        """Token ids through the one completing a stop string; text cut before the stop string."""
        if not stop or self.target.tokenizer is None:
            return outputs, texts
        cut_ids, cut_texts = [], []
        for out, text in zip(outputs, texts):
            hits = [text.find(s) for s in stop if s in text]
            if not hits:
                cut_ids.append(out)
                cut_texts.append(text)
                continue
            end = next(k for k in range(1, len(out) + 1) if any(s in self.decode(out[:k]) for s in stop))
            cut_ids.append(out[:end])
            cut_texts.append(text[: min(hits)])
        return cut_ids, cut_texts


def report_progress(progress, n: int) -> None:
    """Advance a tqdm-like ``progress`` (``generate(progress=...)``) by ``n`` tokens; None: no bar."""
    if progress is not None and n:
        progress.update(n)


def _stream_whole(on_tokens: Optional[OnTokens], results: list[GenerationResult]) -> list[GenerationResult]:
    """``on_tokens`` for loops that return only whole outputs: each request's output in one call."""
    if on_tokens is not None:
        for i, result in enumerate(results):
            on_tokens(i, list(result.token_ids))
    return results


def _per_prompt(sampling: SamplingParams) -> dict[str, np.ndarray]:
    """Validated per-prompt sampling values as numpy arrays, to slice into batches."""
    return {"temperature": np.asarray(sampling.temperature), "top_k": np.asarray(sampling.top_k),
            "top_p": np.asarray(sampling.top_p)}


def _probs(proposals) -> list[np.ndarray]:
    return [p.probs for p in proposals if p is not None]
