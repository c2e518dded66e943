"""CUDA backend: the reference backend's plans, executed without per-step launch overhead or host syncs.

At small batch MAR is launch-bound: every AR step runs each token's 100-step DDPM chain as ~200-300
tiny kernels per head step (``mar.md`` §9). This backend keeps the reference's arithmetic and changes
only how it is issued:

* **Head chains as CUDA graphs.** A chain's shape is ``(rows, head steps, guided)``; rows are padded
  up to a bucket (:func:`row_bucket`) so a few graphs serve every step of every policy. Each
  :class:`HeadChainRunner` owns static buffers (conditions, noise, guidance scale, temperature,
  output) and one captured graph; a call copies its rows in, replays, and reads the real rows out.
  Padded rows hold zeros and are never read (rows of the head MLP are independent).
* **Precomputed tables.** Time embeddings of every reverse step (hoisted out of the chain) and the
  respaced diffusion tables live on the device; the guidance scale and temperature are device
  scalars, so a graph is reused across CFG schedules and temperatures.
* **No host sync inside a step** for static plans: predicted rows are gathered by sorted positions
  (not boolean indexing), the scheduler writes tokens with ``masked_scatter``, counts come from the
  host-side schedule and the per-sample noise is uploaded from pinned memory without blocking.
  Plans with data-dependent sizes still sync where they need a value (FTS ranks tokens to set their
  head budgets; ReCAP reads its group positions): see ``docs/performance.md``.
* **Autocast + fused attention.** ``backend.dtype=bfloat16|float16`` autocasts the transformer and
  the head as the reference backend does; ``scaled_dot_product_attention`` then dispatches to the
  flash / memory-efficient kernels. K/V and feature caches are preallocated once per generation
  (:class:`~marcache.models.partial.FeatureCache`).

Per-head-step chain caches (LazyMAR's head caches) keep Python-side state between head steps and run
eagerly, as on the reference backend.

Without CUDA (or with ``graphs=False``) the runners execute their graph bodies eagerly on the same
static buffers: that is how the CPU test suite checks bucketing, padding, buffer reuse and plan
execution order against the reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from marcache.models.mar import gather_positions, mask_positions

from .base import register_backend
from .reference import _AUTOCAST, ReferenceBackend

#: row buckets of the head graphs; beyond the last, rows round up to a multiple of it (so padding
#: wastes < 64 rows: a power-of-two ladder would pad 700 rows to 1024)
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def row_bucket(rows: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The padded row count a head chain of ``rows`` rows runs at."""
    if rows < 1:
        raise ValueError(f"a head chain needs at least one row, got {rows}")
    for size in buckets:
        if size >= rows:
            return size
    top = buckets[-1]
    return -(-rows // top) * top


@dataclass(frozen=True)
class ChainKey:
    """Everything a captured head chain depends on besides its input values."""

    rows: int  # bucket
    steps: int  # head steps that run
    guided: bool
    clip_denoised: bool
    spec: str = ""  # diffusion spec (``HeadPlan.spec``); "" = str(steps)


class HeadChainRunner:
    """Static buffers and (on CUDA) one captured graph for one :class:`ChainKey`.

    ``__call__(cond, uncond, noise, cfg, temperature)`` runs the chain of
    :meth:`~marcache.models.diffloss.DiffLoss.run_chain` for ``n <= key.rows`` rows and returns the
    ``[n, C]`` float32 samples as a view of the static output (valid until the next call).
    """

    def __init__(self, diffloss, key: ChainKey, device: torch.device, autocast, use_graph: bool):
        self.diffloss, self.key, self.device, self.autocast = diffloss, key, device, autocast
        self.sched = diffloss.schedule(key.spec or key.steps)
        z_dim, channels = diffloss.net.cond_embed.in_features, diffloss.in_channels
        halves = 2 if key.guided else 1
        self.z = torch.zeros(halves * key.rows, z_dim, device=device)
        self.noise = torch.zeros(key.rows, key.steps + 1, channels, device=device)
        self.cfg = torch.ones((), device=device)
        self.temperature = torch.ones((), device=device)
        self.out = torch.zeros(key.rows, channels, device=device)
        with torch.no_grad(), self.autocast():
            # computed exactly as the plain chain computes them (one [1, W] row per step)
            self.time_embeddings = [diffloss.time_embedding(self.sched, j) for j in range(key.steps)]
        self.use_graph = use_graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = 0

    def _body(self) -> None:
        """The chain on the static buffers: fixed shapes and control flow, capturable."""
        head = self.diffloss
        with self.autocast():
            c_emb = head.net.cond_embed(self.z)
            x = head.run_chain(c_emb, self.noise, self.temperature, self.cfg, self.sched, self.key.guided,
                               self.time_embeddings, clip_denoised=self.key.clip_denoised)
        self.out.copy_(x)

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body()  # warm-up outside the capture (cuBLAS workspaces, lazy inits)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        self.graph = graph

    def load(self, cond: torch.Tensor, uncond: Optional[torch.Tensor], noise: torch.Tensor, cfg: float,
             temperature: float) -> int:
        """Copy one chain's inputs into the static buffers (pad rows zeroed); returns its row count."""
        n, rows = cond.shape[0], self.key.rows
        if n > rows or noise.shape[1] != self.key.steps + 1 or (uncond is not None) != self.key.guided:
            raise ValueError(f"chain inputs ({n} rows, {noise.shape[1] - 1} steps) do not fit runner {self.key}")
        self.z[:n].copy_(cond)
        self.z[n:rows].zero_()
        if uncond is not None:
            self.z[rows : rows + n].copy_(uncond)
            self.z[rows + n :].zero_()
        self.noise[:n].copy_(noise)
        self.noise[n:].zero_()
        self.cfg.fill_(cfg)
        self.temperature.fill_(temperature)
        return n

    @torch.no_grad()
    def __call__(self, cond, uncond, noise, cfg: float, temperature: float) -> torch.Tensor:
        n = self.load(cond, uncond, noise, cfg, temperature)
        if self.use_graph and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        self.calls += 1
        return self.out[:n]


@register_backend
class CudaBackend(ReferenceBackend):
    """Reference plans, executed with captured head graphs, static buffers and no per-step host sync.

    Args:
        device / dtype: as for every backend (``dtype`` is the autocast dtype).
        graphs: capture the head chains as CUDA graphs (default: when the device is CUDA). With
            ``False`` the same runners execute eagerly: the CPU path of the tests.
        buckets: row buckets of the head graphs (ascending).
    """

    name = "cuda"

    def __init__(self, device: torch.device, dtype: str = "float32", graphs: Optional[bool] = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS):
        super().__init__(device, dtype)
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending positive row counts, got {list(buckets)}")
        self.buckets = tuple(int(b) for b in buckets)
        self.runners: dict[ChainKey, HeadChainRunner] = {}
        self._model = None

    def prepare(self, model) -> None:
        if model is not self._model:
            self.runners.clear()  # runners hold the previous model's head
            self._model = model
        super().prepare(model)

    def head_autocast(self):
        """Autocast of the head runners: a captured graph must not depend on autocast's weight-cast
        cache (it is freed after the capture), so graphs run with ``cache_enabled=False``."""
        if self.dtype == "float32" or not self.graphs:
            return self.autocast()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.dtype], cache_enabled=False)

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tensor.to(self.device)
        # pinned + non_blocking: the copy is queued on the stream and the host does not wait
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ encoder / decoder
    def known_count(self, step) -> int:
        return step.num_masked

    def predicted_rows(self, step, z: torch.Tensor) -> torch.Tensor:
        """``z [R, L, D]`` -> ``[R, k, D]`` at the predicted positions, by gather (no device sync)."""
        idx = mask_positions(step.mask_to_pred, step.tokens_this_step)
        return gather_positions(z, idx.repeat(z.shape[0] // idx.shape[0], 1))

    # ------------------------------------------------------------------ diffusion head
    def runner(self, head, rows: int, steps: int, guided: bool, clip_denoised: bool = False, spec: str = "") -> HeadChainRunner:
        """The runner of a chain shape (created, and on CUDA captured, on first use). ``spec`` (a
        timestep-capped diffusion, ``HeadPlan.spec``) may run fewer than ``steps`` steps."""
        if spec and spec != str(steps):
            steps = head.schedule(spec).num_timesteps
        else:
            spec = ""
        key = ChainKey(row_bucket(rows, self.buckets), int(steps), bool(guided), bool(clip_denoised), spec)
        if key not in self.runners:
            self.runners[key] = HeadChainRunner(head, key, self.device, self.head_autocast, self.graphs)
        return self.runners[key]

    def run_head(self, step, z, plan, noise) -> torch.Tensor:
        if plan.chain_cache is not None:
            return super().run_head(step, z, plan, noise)
        head = step.gen.model.diffloss
        b, k, c = step.gen.batch_size, z.shape[1], noise.shape[-1]
        guided, z_cond, z_uncond, flat_noise = self.head_inputs(step, z, noise)
        cfg = step.cfg_scale if guided else 1.0
        groups = plan.groups()
        if len(groups) == 1:  # one budget for every token (the official plan): slices, no index tensors
            count = groups[0][0]
            run = self.runner(head, b * k, count, guided, plan.clip_denoised, plan.spec(count))
            out = run(z_cond, z_uncond, flat_noise[:, : run.key.steps + 1], cfg, plan.temperature).clone()
            return out.reshape(b, k, c)
        out = torch.empty(b * k, c, device=z.device, dtype=torch.float32)
        for count, rows in groups:
            rows = rows.to(z.device, non_blocking=True)
            run = self.runner(head, len(rows), count, guided, plan.clip_denoised, plan.spec(count))
            out[rows] = run(z_cond[rows], None if z_uncond is None else z_uncond[rows],
                            flat_noise[rows, : run.key.steps + 1], cfg, plan.temperature)
        return out.reshape(b, k, c)

    def describe(self) -> dict:
        info = super().describe()
        info.update(graphs=self.graphs, head_chains=len(self.runners),
                    head_chain_shapes=sorted((k.rows, k.steps, k.guided) for k in self.runners))
        return info
