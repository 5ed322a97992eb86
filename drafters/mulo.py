"""MuLo-SD's drafting side (Peruzzo et al., 2026): a low-resolution image model drafts the
whole token grid, an up-sampler maps it to high-resolution proposals, and the target
verifies a chain of them from its current raster position.

``MuloDrafter`` is a plain ``HostDrafter``, so with ``Engine`` it runs under the engine's
own acceptance: greedy output equal to plain decoding and sampled output with the target's
distribution, whatever the drafts (MuLo-SD's lossless mode, the default of
``specjax.engine.mulo.generate_mulo``). The relaxed, lossy pooled acceptance and local
rejection change what is accepted, so they are a decoding loop of their own
(``specjax.engine.mulo``), fed by the same drafter's ``high_res_grid``.

The low-resolution grids of a batch are drafted in one batched decoding run at the first
``propose`` after the engine has started every request of the batch (``start_request`` only
records the prompt), not one run per request.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import HostDrafter, Proposal
from specjax.models.image_tokens import upsample_nearest
from specjax.models.loading import Model

UPSAMPLER_FILE = "upsampler.safetensors"  # the trained ConvUpsampler, shipped next to image-gen-lo's weights
Upsampler = Callable[[np.ndarray], np.ndarray]  # int [N, g, g] low-res tokens -> int [N, G, G] proposals


@dataclasses.dataclass(frozen=True)
class NearestUpsampler:
    """Each low-resolution token proposed for all ``factor x factor`` high-resolution patches it
    covers: exact where the image is flat at the low resolution, wrong only along edges. Valid
    because both resolutions share one palette (``models.image_tokens``)."""

    factor: int = 2

    def __call__(self, low: np.ndarray) -> np.ndarray:
        return upsample_nearest(low, self.factor)


def draft_low_res(model: Model, prompts: Sequence[Sequence[int]], grid: int, temperature: float = 0.0,
                  seeds=0) -> np.ndarray:
    """int32[N, grid, grid]: the low-resolution model's raster grids for ``prompts``, decoded in
    one batch (plain decoding: ``grid ** 2`` cheap passes of the small model)."""
    from specjax.engine.plain import generate_plain

    outs = generate_plain(model, prompts, grid * grid, temperature=temperature, seed=seeds, stop_at_eos=False)
    return np.asarray(outs, np.int32).reshape(len(prompts), grid, grid)


class MuloDrafter(HostDrafter):
    """Chains of up-sampled low-resolution tokens from each request's current raster position.

    Args:
      low_res: the low-resolution model (same vocabulary as the target).
      low_grid: its token grid side (8 for ``image-gen-lo``).
      upsampler: low grid -> high grid (``NearestUpsampler(2)`` maps 8 x 8 to 16 x 16).
      temperature: the low-resolution model's sampling temperature (0: greedy drafts).
      seed: request k (in ``start_request`` order) drafts with seed ``seed + k``.

    Proposals are chains (parents ``-1, 0, 1, ...``) of up to ``max_tokens`` tokens, cut at the
    end of the image. ``probs`` are ones: the drafter claims no calibrated confidence, so use it
    with a fixed ``draft_capacity`` (a block of rows: ``rows * width``), not "auto".
    """

    learns_across_requests = False

    def __init__(self, low_res: Model, low_grid: int, upsampler: Upsampler = NearestUpsampler(2),
                 temperature: float = 0.0, seed: int = 0):
        self.low_res, self.low_grid, self.upsampler = low_res, low_grid, upsampler
        self.temperature, self.seed = temperature, seed
        self._prompts: dict[Hashable, tuple[int, ...]] = {}
        self._generated: dict[Hashable, int] = {}
        self._seeds: dict[Hashable, int] = {}
        self._grids: dict[Hashable, np.ndarray] = {}
        self._started = 0
        self.low_res_passes = 0  # passes of the low-resolution model so far (its prefill counts as one)

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        self._prompts[request_id] = tuple(int(t) for t in prompt_ids)
        self._generated[request_id] = 0
        self._seeds[request_id] = self.seed + self._started
        self._started += 1

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        self._generated[request_id] += len(accepted_ids)

    def stop_request(self, request_id: Hashable) -> None:
        for book in (self._prompts, self._generated, self._seeds, self._grids):
            book.pop(request_id, None)

    def high_res_grid(self, request_id: Hashable) -> np.ndarray:
        """int32[G, G]: this request's up-sampled proposals (drafting every started request that has
        none yet in one batch)."""
        if request_id not in self._grids:
            pending = [r for r in self._prompts if r not in self._grids]
            if self.temperature == 0:  # greedy drafts depend on the prompt alone: one row per distinct prompt
                prompts = list(dict.fromkeys(self._prompts[r] for r in pending))
                seeds = [0] * len(prompts)
                index = {prompt: i for i, prompt in enumerate(prompts)}
                row_of = {r: index[self._prompts[r]] for r in pending}
            else:
                prompts, seeds = [self._prompts[r] for r in pending], [self._seeds[r] for r in pending]
                row_of = {r: i for i, r in enumerate(pending)}
            low = draft_low_res(self.low_res, prompts, self.low_grid, self.temperature, seeds)
            self.low_res_passes += self.low_grid ** 2  # its prefill gives the first token, one pass per further one
            high = np.asarray(self.upsampler(low), np.int32)
            self._grids.update({r: high[i] for r, i in row_of.items()})
        return self._grids[request_id]

    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        flat = self.high_res_grid(request_id).reshape(-1)
        n = self._generated[request_id]
        tokens = flat[n: n + max_tokens]
        if len(tokens) == 0:
            return Proposal.empty()
        k = len(tokens)
        return Proposal(tokens.astype(np.int32), np.arange(-1, k - 1, dtype=np.int32), np.ones(k, np.float32),
                        score=float(k))



@dataclasses.dataclass(frozen=True)
class ConvUpsampler:
    """A trained up-sampler: token embeddings, two 3 x 3 convolutions over the low-resolution grid
    and a pixel shuffle to ``factor x factor`` high-resolution logits per low-resolution token.

    Plain pytree code (``params``: ``embed`` [K, E], ``conv1`` [3, 3, E, C], ``bias1`` [C],
    ``conv2`` [3, 3, C, f * f * K], ``bias2``); the 3 x 3 context lets it place an edge inside
    a low-resolution patch from its neighbours, where nearest up-sampling repeats one token.
    Trained by ``benchmarks/train_image_gen.py`` on (8 x 8, 16 x 16) token pairs of drawn images.
    """

    params: dict
    factor: int = 2

    def __call__(self, low: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.argmax(upsampler_logits(self.params, jnp.asarray(low), self.factor), -1), np.int32)


def init_upsampler(key: jax.Array, codebook_size: int, factor: int = 2, embed: int = 16,
                   channels: int = 64) -> dict:
    """Random ``ConvUpsampler`` params (scaled normal convolutions, zero biases)."""
    k1, k2, k3 = jax.random.split(key, 3)
    out = factor * factor * codebook_size
    return {"embed": jax.random.normal(k1, (codebook_size, embed)) * 0.5,
            "conv1": jax.random.normal(k2, (3, 3, embed, channels)) / np.sqrt(9 * embed),
            "bias1": jnp.zeros(channels),
            "conv2": jax.random.normal(k3, (3, 3, channels, out)) / np.sqrt(9 * channels),
            "bias2": jnp.zeros(out)}


def upsampler_logits(params: dict, low: jax.Array, factor: int = 2) -> jax.Array:
    """float32[N, g * f, g * f, K] logits of the high-resolution tokens from int low[N, g, g].
    Tokens outside the palette (a sampled class or bos id) read as palette entry 0."""
    k = params["embed"].shape[0]
    x = params["embed"][jnp.where((low >= 0) & (low < k), low, 0)]
    conv = lambda x, w, b: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    x = jax.nn.gelu(conv(x, params["conv1"], params["bias1"]))
    x = conv(x, params["conv2"], params["bias2"])
    n, g = x.shape[0], x.shape[1]
    x = x.reshape(n, g, g, factor, factor, k).transpose(0, 1, 3, 2, 4, 5)  # pixel shuffle
    return x.reshape(n, g * factor, g * factor, k)


def save_upsampler(path: str, upsampler: ConvUpsampler) -> None:
    """A ``ConvUpsampler`` as one float32 safetensors file (its factor in the metadata)."""
    from specjax.models.training import save_safetensors

    save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in upsampler.params.items()},
                     metadata={"factor": str(upsampler.factor)})


def load_upsampler(path: str) -> ConvUpsampler:
    """The ``ConvUpsampler`` saved by ``save_upsampler`` (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        params = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
        factor = int(f.metadata()["factor"])
    return ConvUpsampler(params, factor)
