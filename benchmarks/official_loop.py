"""A straightforward re-implementation of the official LTH14/mar sampling loop: the external baseline.

``MAR.sample_tokens`` + ``DiffLoss.sample`` + the ADM ``GaussianDiffusion.p_sample_loop`` as the
reference code runs them (``mar.md`` §5-6), on marcache's model modules, including the reference's
host work per head step: diffusion tables kept as float64 numpy arrays and copied to the device on
every lookup (``_extract_into_tensor``), a fresh ``torch.tensor([i] * N)`` timestep per step, the time
embedding recomputed for every row, the CFG half of ``x`` duplicated, boolean indexing with host
syncs. Official evaluation wraps it in fp16 autocast (``autocast_dtype=torch.float16``).

Randomness: ``generators=None`` draws like the reference (numpy-shuffled orders, ``torch.randn`` per
head step). With per-sample ``generators`` (marcache's protocol: each sample's generator gives its
order and one ``[k, T + 1, C]`` noise block per step) the result equals marcache's baseline sampler,
which ``tests/test_scheduler.py`` checks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import numpy as np
import torch

from marcache.models.diffusion import diffusion_tables


class OfficialDiffusion:
    """ADM's respaced ``GaussianDiffusion`` as the reference samples with it (numpy tables)."""

    def __init__(self, steps: str = "100"):
        tables = diffusion_tables(steps)
        self.timestep_map = tables["timestep_map"]
        self.num_timesteps = len(tables["betas"])
        self.tables = tables

    @staticmethod
    def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
        res = torch.from_numpy(arr).to(device=t.device)[t].float()
        while len(res.shape) < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def p_sample(self, model, x, t, noise, temperature, model_kwargs, clip_denoised=False):
        tb = self.tables
        map_tensor = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)  # _WrappedModel
        out = model(x, map_tensor[t], **model_kwargs)
        eps, var_values = torch.split(out, x.shape[1], dim=1)
        min_log = self._extract(tb["posterior_log_variance_clipped"], t, x.shape)
        max_log = self._extract(np.log(tb["betas"]), t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._extract(tb["sqrt_recip_alphas_cumprod"], t, x.shape) * x - self._extract(tb["sqrt_recipm1_alphas_cumprod"], t, x.shape) * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self._extract(tb["posterior_mean_coef1"], t, x.shape) * pred_xstart + self._extract(tb["posterior_mean_coef2"], t, x.shape) * x
        nonzero = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise * temperature


def official_sample_tokens(model, labels: Sequence[int], num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                           temperature: float = 1.0, *, generators: Optional[list] = None,
                           autocast_dtype: Optional[torch.dtype] = None, head_steps: str = "100",
                           clip_denoised: bool = False) -> torch.Tensor:
    """Sample ``[len(labels), L, C]`` tokens the way the reference code does (see the module docstring)."""
    device = next(model.parameters()).device
    bsz, seq_len, c = len(labels), model.seq_len, model.token_embed_dim
    diffusion = OfficialDiffusion(head_steps)
    n_t = diffusion.num_timesteps
    if generators is None:
        orders = []
        for _ in range(bsz):
            order = np.array(list(range(seq_len)))
            np.random.shuffle(order)
            orders.append(order)
        orders = torch.Tensor(np.array(orders)).to(device).long()
    else:
        orders = torch.stack([torch.randperm(seq_len, generator=g) for g in generators]).to(device)
    mask = torch.ones(bsz, seq_len, device=device)
    tokens = torch.zeros(bsz, seq_len, c, device=device)
    labels = torch.as_tensor(list(labels), device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    net = model.diffloss.net
    with torch.no_grad(), autocast:
        for step in range(num_iter):
            cur_tokens = tokens.clone()
            class_embedding = model.class_emb(labels)
            if cfg != 1.0:
                tokens = torch.cat([tokens, tokens], dim=0)
                class_embedding = torch.cat([class_embedding, model.fake_latent.repeat(bsz, 1)], dim=0)
                mask = torch.cat([mask, mask], dim=0)
            x = model.forward_mae_encoder(tokens, mask, class_embedding)
            z = model.forward_mae_decoder(x, mask)
            mask_ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
            mask_len = torch.Tensor([math.floor(seq_len * mask_ratio)]).to(device)
            mask_len = torch.maximum(torch.Tensor([1]).to(device), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
            mask_next = torch.zeros(bsz, seq_len, device=device).scatter(
                -1, orders[:, : int(mask_len[0])], torch.ones(bsz, seq_len, device=device)).bool()
            mask_to_pred = mask[:bsz].bool() if step >= num_iter - 1 else torch.logical_xor(mask[:bsz].bool(), mask_next)
            mask = mask_next.float()
            if cfg != 1.0:
                mask_to_pred = torch.cat([mask_to_pred, mask_to_pred], dim=0)
            z = z[mask_to_pred.nonzero(as_tuple=True)]
            cfg_iter = 1 + (cfg - 1) * (seq_len - mask_len[0]) / seq_len if cfg_schedule == "linear" else cfg
            # DiffLoss.sample
            rows = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
            if generators is None:
                blocks = None
                xt = torch.randn(rows, c).to(device)
            else:
                k = rows // bsz
                blocks = torch.cat([torch.randn(k, n_t + 1, c, generator=g) for g in generators]).to(device)
                xt = blocks[:, 0]
            if cfg != 1.0:
                xt = torch.cat([xt, xt])
                fn, kwargs = net.forward_with_cfg, {"c": z, "cfg_scale": cfg_iter}
            else:
                fn, kwargs = net.forward, {"c": z}
            for j, i in enumerate(range(n_t - 1, -1, -1)):
                t = torch.tensor([i] * xt.shape[0], device=device)
                if blocks is None:
                    step_noise = torch.randn_like(xt)
                else:
                    step_noise = blocks[:, 1 + j] if cfg == 1.0 else torch.cat([blocks[:, 1 + j], blocks[:, 1 + j]])
                xt = diffusion.p_sample(fn, xt, t, step_noise, temperature, kwargs, clip_denoised)
            sampled = xt[:rows]
            if cfg != 1.0:
                mask_to_pred, _ = mask_to_pred.chunk(2, dim=0)
            cur_tokens[mask_to_pred.nonzero(as_tuple=True)] = sampled.to(cur_tokens.dtype)
            tokens = cur_tokens.clone()
    return tokens
