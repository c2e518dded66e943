"""The DDPM process of MAR's diffusion head (improved-DDPM cosine schedule, learned-range variance).

Faithful to the ``diffusion/`` package LTH14/mar took from DiT/ADM:

* 1000 base steps, ``alpha_bar(t) = cos(((t/1000) + 0.008) / 1.008 * pi/2)^2``, betas clipped at 0.999;
* respacing to any count ("100", "50", "25", "" = no respacing) with ADM's ``space_timesteps``
  (float stride accumulated and Python-rounded), betas recomputed from the kept ``alpha_bar``;
* epsilon prediction, ``LEARNED_RANGE`` variance, ``clip_denoised=False``;
* ``temperature`` scales only the per-step noise.

All tables are computed once in float64 (as numpy does in the reference) and kept as float32
non-persistent buffers, so they follow the module's device and never enter the state dict. The
reference extracts ``table[t]`` from float64 and casts to float32, which is what indexing the float32
copy gives.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

NUM_TRAIN_TIMESTEPS = 1000

_TABLES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def cosine_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the improved-DDPM cosine schedule (float64)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def respaced_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """ADM's ``space_timesteps`` for a section spec such as ``"100"`` or ``"10,15,20"``.

    ``""`` keeps every step. Each section is strided with a float stride accumulated by repeated
    addition and rounded with Python's ``round`` (as the reference does), so e.g. ``"100"`` keeps
    0, 10, 20, 30, 40, 50, 61, ..., 989, 999.
    """
    spec = str(spec).strip()
    if spec == "":
        return list(range(num_timesteps))
    try:
        counts = [int(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"diffusion step spec {spec!r}: expected a count such as '100' or comma-separated counts") from None
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    taken: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"diffusion step spec {spec!r}: cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            taken.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(taken))


def capped_timesteps(spec: str | int) -> list[int]:
    """Timesteps of a spec ``"N"`` or ``"N@C"``: the latter respaces to N steps, then clips every
    timestep above C to C and merges duplicates (DiSA's release: ``create_diffusion(str(N))`` with its
    default ``clip_timesteps=950``, so e.g. 50 requested steps run 48)."""
    spec = str(spec).strip()
    if "@" not in spec:
        return respaced_timesteps(NUM_TRAIN_TIMESTEPS, spec)
    count, cap = spec.split("@", 1)
    try:
        cap = int(cap)
    except ValueError:
        raise ValueError(f"diffusion step spec {spec!r}: the timestep cap after '@' must be an integer") from None
    if not 0 < cap < NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"diffusion step spec {spec!r}: the timestep cap must be in [1, {NUM_TRAIN_TIMESTEPS - 1}]")
    return sorted({min(t, cap) for t in respaced_timesteps(NUM_TRAIN_TIMESTEPS, count)})


def diffusion_tables(spec: str | int = "") -> dict[str, np.ndarray]:
    """float64 tables of the (respaced) diffusion, keyed like the reference attributes."""
    base_betas = cosine_betas()
    alphas_cumprod_base = np.cumprod(1.0 - base_betas)
    timestep_map = capped_timesteps(spec)
    keep = set(timestep_map)
    betas, last = [], 1.0
    for i, a in enumerate(alphas_cumprod_base):
        if i in keep:
            betas.append(1 - a / last)
            last = a
    betas = np.array(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
    return {
        "timestep_map": np.array(timestep_map, dtype=np.int64),
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion(nn.Module):
    """One (possibly respaced) diffusion process with precomputed float32 device tables.

    ``t`` arguments are *respaced* indices; the network receives ``timestep_map[t]`` (the original
    step number, no rescaling), as the reference's ``_WrappedModel`` does.
    """

    def __init__(self, spec: str | int = ""):
        super().__init__()
        self.spec = str(spec)
        tables = diffusion_tables(self.spec)
        self.num_timesteps = len(tables["betas"])
        for name in _TABLES:
            self.register_buffer(name, torch.tensor(tables[name], dtype=torch.float32), persistent=False)
        self.register_buffer("timestep_map", torch.tensor(tables["timestep_map"]), persistent=False)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, num_timesteps={self.num_timesteps}"

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].unsqueeze(-1)

    def q_sample(self, x_start, t, noise):
        return self._at(self.sqrt_alphas_cumprod, t) * x_start + self._at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = self._at(self.posterior_mean_coef1, t) * x_start + self._at(self.posterior_mean_coef2, t) * x_t
        return mean, self._at(self.posterior_variance, t), self._at(self.posterior_log_variance_clipped, t)

    def p_mean_variance_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = False) -> dict:
        """Mean/variance of p(x_{t-1} | x_t) from the net's 2C output channels (eps, v).

        ``clip_denoised`` clamps the predicted x_0 to [-1, 1] (ADM's option for pixel-space models;
        MAR's latents are unbounded and the reference passes False)."""
        c = x.shape[1]
        eps, var_values = model_output[:, :c], model_output[:, c:]
        min_log = self._at(self.posterior_log_variance_clipped, t)
        max_log = self._at(self.log_betas, t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._at(self.sqrt_recip_alphas_cumprod, t) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t) * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict] = None) -> dict:
        out = model(x, self.timestep_map[t], **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x, t)

    def p_sample(self, model, x, t, noise, temperature: float = 1.0, model_kwargs=None) -> dict:
        """One reverse step with the Gaussian draw ``noise`` supplied by the caller."""
        out = self.p_mean_variance(model, x, t, model_kwargs)
        nonzero = (t != 0).float().unsqueeze(-1)
        out["sample"] = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return out

    def training_losses(self, model: Callable, x_start, t, model_kwargs=None, noise=None) -> torch.Tensor:
        """Per-row loss: epsilon MSE + the variational bound term (in bits), as in the reference."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.timestep_map[t], **(model_kwargs or {}))
        c = x_t.shape[1]
        eps, var_values = out[:, :c], out[:, c:]
        # The VB term trains only the variance: the mean goes in detached.
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        pred = self.p_mean_variance_from_output(frozen, x_t, t)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = _normal_kl(true_mean, true_log_var, pred["mean"], pred["log_variance"]).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, pred["mean"], 0.5 * pred["log_variance"]).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return mse + vb
