"""MAR's per-token diffusion head: ``SimpleMLPAdaLN`` and ``DiffLoss`` (official names and semantics)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .diffusion import GaussianDiffusion


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos, sin], max period 10000, fp32) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class ResBlock(nn.Module):
    """adaLN residual MLP block: ``x + gate * mlp(LN(x) * (1 + scale) + shift)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The head network: ``x_t [N, C]``, original timestep ``t [N]``, condition ``c [N, D]`` -> ``[N, 2C]``."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # adaLN-zero: every modulation and the output projection start at zero.
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The trunk from ``x_t`` and the already summed embedding ``y = time_embed(t) + cond_embed(c)``."""
        x = self.input_proj(x)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """CFG on epsilon only: rows ``[cond; uncond]``; only the first half of ``x`` is used.

        The variance channels are not guided: each half keeps its own.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """The diffusion loss/head of MAR: training loss on 1000 steps, sampling on a respaced process.

    ``schedule(steps)`` returns (and caches) the respaced process for any head-step count, on the
    head's device, so plugins can give different tokens different budgets.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: str = "100", grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth, grad_checkpointing)
        self.train_diffusion = GaussianDiffusion("")
        self.gen_diffusion = GaussianDiffusion(num_sampling_steps)
        self._schedules: dict[str, GaussianDiffusion] = {self.gen_diffusion.spec: self.gen_diffusion}

    def schedule(self, steps: int | str) -> GaussianDiffusion:
        """The diffusion respaced to ``steps`` head steps, on the same device as the head."""
        key = str(steps)
        if key not in self._schedules:
            self._schedules[key] = GaussianDiffusion(key).to(self.gen_diffusion.betas.device)
        sched = self._schedules[key]
        if sched.betas.device != self.gen_diffusion.betas.device:
            sched.to(self.gen_diffusion.betas.device)
        return sched

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        loss = self.train_diffusion.training_losses(self.net, target, t, dict(c=z))
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    def sample_with_noise(self, z: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0,
                          steps: int | str | None = None, clip_denoised: bool = False) -> torch.Tensor:
        """Run the full reverse chain with caller-supplied Gaussian draws.

        ``z``: conditions, ``[N, D]``, or ``[2N, D]`` (cond rows then uncond rows) when ``cfg != 1``.
        ``noise``: ``[N, T + 1, C]``; ``noise[:, 0]`` is the initial ``x_T`` (not scaled by the
        temperature), ``noise[:, 1 + j]`` the draw of the j-th reverse step (T - 1 - j). Returns
        ``[N, C]``: the conditional samples only (under CFG the unconditional half of the reference's
        output is a copy driven by the same guided epsilon and is dropped by MAR anyway).
        ``clip_denoised`` clamps each predicted x_0 to [-1, 1] (pixel-space models; False = reference).
        """
        sched = self.schedule(steps) if steps is not None else self.gen_diffusion
        # The condition embedding is the same at every step of the chain; only time changes.
        return self.run_chain(self.net.cond_embed(z), noise, temperature, cfg, sched, guided=cfg != 1.0,
                              clip_denoised=clip_denoised)

    def time_embedding(self, sched: GaussianDiffusion, j: int) -> torch.Tensor:
        """``[1, W]`` time embedding of the j-th reverse step of ``sched`` (the same for every row)."""
        i = sched.num_timesteps - 1 - j
        return self.net.time_embed(sched.timestep_map[i : i + 1])

    def run_chain(self, c_emb: torch.Tensor, noise: torch.Tensor, temperature, cfg, sched: GaussianDiffusion,
                  guided: bool, time_embeddings: Optional[list[torch.Tensor]] = None,
                  clip_denoised: bool = False) -> torch.Tensor:
        """The reverse chain from embedded conditions: the one definition of the head's sampling math.

        ``c_emb``: ``net.cond_embed(z)``, ``[N, W]`` (``[2N, W]`` cond rows then uncond rows when
        ``guided``). ``temperature`` and ``cfg`` are floats or 0-d tensors (a captured CUDA graph reads
        them from static buffers). ``time_embeddings``: precomputed :meth:`time_embedding` per step.
        Shapes and control flow depend only on ``(N, T, guided)``: no host sync inside.
        """
        n = noise.shape[0]
        x = noise[:, 0]
        for j, i in enumerate(range(sched.num_timesteps - 1, -1, -1)):
            t = torch.full((n,), i, dtype=torch.long, device=c_emb.device)
            t_emb = time_embeddings[j] if time_embeddings is not None else self.time_embedding(sched, j)
            if guided:
                out = self.net.forward_embedded(torch.cat([x, x], dim=0), t_emb + c_emb)
                eps_c, eps_u = out[:n, : self.in_channels], out[n:, : self.in_channels]
                eps = eps_u + cfg * (eps_c - eps_u)
                out = torch.cat([eps, out[:n, self.in_channels :]], dim=1)
            else:
                out = self.net.forward_embedded(x, t_emb + c_emb)
            step = sched.p_mean_variance_from_output(out, x, t, clip_denoised)
            if i != 0:  # no noise at the last step
                x = step["mean"] + torch.exp(0.5 * step["log_variance"]) * noise[:, 1 + j] * temperature
            else:
                x = step["mean"]
        return x

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0) -> torch.Tensor:
        """Official signature: draws the noise from torch's global RNG; returns ``[len(z), C]``."""
        n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        noise = torch.randn(n, self.gen_diffusion.num_timesteps + 1, self.in_channels, device=z.device)
        out = self.sample_with_noise(z, noise, temperature, cfg)
        return torch.cat([out, out], dim=0) if cfg != 1.0 else out
