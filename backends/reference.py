"""Reference backend: eager PyTorch, CPU or CUDA, float32 or bf16/fp16 autocast.

This is the executable definition of every plan: other backends are tested against it.
"""

from __future__ import annotations

import contextlib

import torch

from marcache.errors import ConfigError

from .base import Backend, register_backend

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@register_backend
class ReferenceBackend(Backend):
    name = "reference"

    def autocast(self):
        """fp32: no autocast. bf16/fp16: autocast over the transformer and head (as official eval
        runs fp16 autocast); token values, diffusion state and coefficients stay float32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST[self.dtype])

    # ------------------------------------------------------------------ encoder / decoder
    def class_embeddings(self, step) -> torch.Tensor:
        gen, model = step.gen, step.gen.model
        b = gen.batch_size
        null = model.fake_latent.repeat(b, 1)
        cond = model.class_emb(gen.labels) if gen.labels is not None else null
        return torch.cat([cond, null]) if gen.guided else cond

    def run_forward(self, step, plan) -> torch.Tensor:
        model, gen = step.gen.model, step.gen
        rows = 2 if gen.guided else 1
        tokens = step.tokens.repeat(rows, 1, 1)
        mask = step.mask.float().repeat(rows, 1)
        class_emb = self.class_embeddings(step)
        with self.autocast():
            if plan.mode == "full":
                x = model.forward_mae_encoder(tokens, mask, class_emb, self.known_count(step))
                z = model.forward_mae_decoder(x, mask, self.known_count(step))
            elif plan.mode == "cached":
                z = model.decoder_output(self._cached_states(step, plan, tokens, mask, class_emb))
            else:
                raise ConfigError(f"forward plan mode {plan.mode!r} (set by {plan.owner!r}) is not supported by the {self.name} backend")
        return self.predicted_rows(step, z).float()

    def known_count(self, step):
        """The masked count per row handed to the model's gathers: None = the official boolean
        indexing (a device sync on CUDA); the CUDA backend passes the host-side count."""
        return None

    def predicted_rows(self, step, z: torch.Tensor) -> torch.Tensor:
        """``z [R, L, D]`` -> ``[R, k, D]`` at the positions predicted this step (ascending)."""
        pred = step.mask_to_pred.repeat(z.shape[0] // step.gen.batch_size, 1)
        return z[pred].reshape(z.shape[0], -1, z.shape[-1])

    @staticmethod
    def _cached_states(step, plan, tokens, mask, class_emb) -> torch.Tensor:
        """Pre-norm decoder states of every row from a partial pass (and the condition cache)."""
        from marcache.models.partial import cached_forward

        model, gen, cache = step.gen.model, step.gen, plan.cache
        b, total = gen.batch_size, tokens.shape[0]
        if not cache.ready:
            cache.allocate(model, total, tokens.device)
        run = slice(0, b) if plan.branches == "cond" else slice(0, total)
        states = cached_forward(model, tokens[run], mask[run], class_emb[run], cache, plan.spec, run, step.num_masked)
        if plan.branches == "cond" and gen.guided:
            states = torch.cat([states, states + plan.cond_diff.to(states.dtype)])
        return states

    # ------------------------------------------------------------------ diffusion head
    @staticmethod
    def head_inputs(step, z, noise):
        """``(guided, z_cond [B*k, D], z_uncond [B*k, D] | None, noise [B*k, T+1, C])`` of a step's chains."""
        b, k, d = step.gen.batch_size, z.shape[1], z.shape[2]
        # cfg_iter == 1 at a guided step: the reference samples with the plain net (cond rows only).
        guided = step.gen.guided and step.cfg_scale != 1.0
        z_uncond = z[b:].reshape(b * k, d) if guided else None
        return guided, z[:b].reshape(b * k, d), z_uncond, noise.reshape(b * k, noise.shape[2], noise.shape[-1])

    def run_head(self, step, z, plan, noise) -> torch.Tensor:
        head = step.gen.model.diffloss
        b, k, c = step.gen.batch_size, z.shape[1], noise.shape[-1]
        guided, z_cond, z_uncond, flat_noise = self.head_inputs(step, z, noise)
        out = torch.empty(b * k, c, device=z.device, dtype=torch.float32)
        sample = plan.chain_cache.sample if plan.chain_cache is not None else None
        for count, rows in plan.groups():
            cond = z_cond[rows] if not guided else torch.cat([z_cond[rows], z_uncond[rows]])
            args = (cond, flat_noise[rows, : count + 1], plan.temperature, step.cfg_scale if guided else 1.0)
            with self.autocast():
                kw = dict(steps=plan.spec(count), clip_denoised=plan.clip_denoised)
                chain = sample(head, *args, **kw) if sample else head.sample_with_noise(*args, **kw)
            out[rows] = chain.float()
        return out.reshape(b, k, c)
