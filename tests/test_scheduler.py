"""The hooked loop with only built-in plugins is the official MAR sampler."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.plugins.cosine_schedule import cosine_tokens_per_step
from marcache.policy import load_policy
from marcache.scheduler import Sampler, generate_tokens, sample_generators

SCHEDULES = json.loads((Path(__file__).parent / "fixtures" / "mar_parity" / "schedules.json").read_text())


def official_loop(model, labels, num_iter, cfg, cfg_schedule, temperature, seed, sample_ids):
    """A straightforward transcription of LTH14/mar ``MAR.sample_tokens`` + ``DiffLoss.sample``.

    The only change is where randomness comes from (marcache's documented protocol): sample i's
    generator gives its order (randperm) and, at each step, one ``[k, T+1, C]`` noise block.
    """
    bsz, seq_len, c = len(labels), model.seq_len, model.token_embed_dim
    gens = sample_generators(seed, sample_ids)
    orders = torch.stack([torch.randperm(seq_len, generator=g) for g in gens])
    mask = torch.ones(bsz, seq_len)
    tokens = torch.zeros(bsz, seq_len, c)
    diffusion = model.diffloss.gen_diffusion
    n_t = diffusion.num_timesteps
    labels = torch.tensor(labels)
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
        mask_len = torch.Tensor([math.floor(seq_len * mask_ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
        mask_next = torch.zeros(bsz, seq_len).scatter(-1, orders[:, : int(mask_len[0])], torch.ones(bsz, seq_len)).bool()
        if step >= num_iter - 1:
            mask_to_pred = mask[:bsz].bool()
        else:
            mask_to_pred = torch.logical_xor(mask[:bsz].bool(), mask_next)
        mask = mask_next.float()
        if cfg != 1.0:
            mask_to_pred = torch.cat([mask_to_pred, mask_to_pred], dim=0)
        z = z[mask_to_pred.nonzero(as_tuple=True)]
        if cfg_schedule == "linear":
            cfg_iter = 1 + (cfg - 1) * (seq_len - mask_len[0]) / seq_len
        else:
            cfg_iter = cfg
        k = int(mask_to_pred[0].sum())
        noise = torch.cat([torch.randn(k, n_t + 1, c, generator=g) for g in gens])  # [B*k, T+1, C]
        if cfg != 1.0:
            xt = torch.cat([noise[:, 0], noise[:, 0]])
            fn, kwargs = model.diffloss.net.forward_with_cfg, {"c": z, "cfg_scale": cfg_iter}
        else:
            xt = noise[:, 0]
            fn, kwargs = model.diffloss.net.forward, {"c": z}
        for j, i in enumerate(range(n_t - 1, -1, -1)):
            t = torch.tensor([i] * xt.shape[0])
            step_noise = noise[:, 1 + j] if cfg == 1.0 else torch.cat([noise[:, 1 + j], noise[:, 1 + j]])
            xt = diffusion.p_sample(fn, xt, t, step_noise, temperature, kwargs)["sample"]
        sampled = xt[: bsz * k] if cfg != 1.0 else xt
        if cfg != 1.0:
            mask_to_pred, _ = mask_to_pred.chunk(2, dim=0)
        cur_tokens[mask_to_pred.nonzero(as_tuple=True)] = sampled
        tokens = cur_tokens.clone()
    return tokens


@pytest.mark.parametrize("cfg,schedule,temperature,head", [(3.0, "linear", 1.0, "100"), (1.0, "linear", 0.95, "25"), (2.5, "constant", 1.0, "25")])
def test_identity_with_official_loop(cfg, schedule, temperature, head):
    from conftest import make_tiny

    model = make_tiny(num_sampling_steps=head)
    labels = [3, 7]
    with torch.no_grad():
        expected = official_loop(model, labels, 6, cfg, schedule, temperature, seed=11, sample_ids=[0, 1])
        got = generate_tokens(model, labels=labels, num_iter=6, cfg=cfg, cfg_schedule=schedule,
                              temperature=temperature, seed=11).tokens
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("entry", SCHEDULES["mask_schedule"]["entries"], ids=lambda e: f"L{e['seq_len']}-T{e['num_iter']}")
def test_schedule_matches_reference(entry):
    counts = cosine_tokens_per_step(entry["seq_len"], entry["num_iter"])
    assert counts == entry["tokens_revealed"]
    masked, scales = entry["seq_len"], []
    for n in counts:
        masked -= n
        scales.append(linear_cfg_scale(entry["cfg"], entry["seq_len"], max(masked, 1)))
    assert scales == entry["cfg_iter"]  # float32 arithmetic, as the reference


def test_scheduler_reports_reference_schedule(tiny_model):
    entry = next(e for e in SCHEDULES["mask_schedule"]["entries"] if e["seq_len"] == 16 and e["num_iter"] == 8)
    sampler = Sampler(tiny_model, load_policy("baseline", ["sampler.num_iter=8", "sampler.cfg=3.0", "sampler.head_steps=3"]))
    report = sampler.generate(labels=[1], seed=0).report
    assert [s["tokens"] for s in report["steps"]] == entry["tokens_revealed"]
    assert [s["cfg_scale"] for s in report["steps"]] == entry["cfg_iter"]


def _baseline(model, *overrides):
    return Sampler(model, load_policy("baseline", ["sampler.head_steps=5", *overrides]))


def test_batch_invariance_and_determinism(tiny_model):
    sampler = _baseline(tiny_model, "sampler.num_iter=5")
    labels = [0, 4, 9]
    batched = sampler.generate(labels=labels, seed=5, batch_size=3).tokens
    single = torch.cat([sampler.generate(labels=[lab], seed=5, sample_offset=i).tokens for i, lab in enumerate(labels)])
    assert rel_err(batched, single) < 1e-6
    again = sampler.generate(labels=labels, seed=5, batch_size=2).tokens
    assert rel_err(again, batched) < 1e-6
    other = sampler.generate(labels=labels, seed=6, batch_size=3).tokens
    assert rel_err(other, batched) > 1e-2


def test_unconditional_and_report(tiny_model):
    result = _baseline(tiny_model, "sampler.num_iter=4", "sampler.cfg=1.0").generate(num_images=2, seed=0)
    assert result.labels is None and torch.isfinite(result.tokens).all()
    report = result.report
    assert report["num_steps"] == 4 and report["sampler"]["cfg"] == 1.0
    assert report["engagement"]["full_recompute"]["full_steps"] == 4
    assert report["engagement"]["ddpm_head"]["head_chains"] == 2 * 16
    assert all(s["rows"] == 2 and s["owners"] == {"forward": "full_recompute", "head": "ddpm_head"} for s in report["steps"])


def test_head_steps_override_changes_chain_length(tiny_model):
    report = _baseline(tiny_model, "sampler.num_iter=2", "sampler.head_steps=7").generate(labels=[1], seed=0).report
    assert all(set(s["head_rows_by_steps"]) == {"7"} for s in report["steps"])


def test_bad_generate_arguments(tiny_model):
    from marcache.errors import ConfigError

    sampler = _baseline(tiny_model, "sampler.num_iter=2")
    with pytest.raises(ConfigError, match="class ids"):
        sampler.generate(labels=[10])
    with pytest.raises(ConfigError, match="num-images"):
        sampler.generate(labels=[1, 2], num_images=3)
    with pytest.raises(ConfigError, match="num_iter=17"):
        _baseline(tiny_model, "sampler.num_iter=17").generate(labels=[1])
    with pytest.raises(ConfigError, match="cfg_schedule='cosine'"):
        _baseline(tiny_model, "sampler.cfg_schedule=cosine").generate(labels=[1])


def test_bfloat16_autocast_backend(tiny_model):
    fp32 = _baseline(tiny_model, "sampler.num_iter=4").generate(labels=[1, 2], seed=0).tokens
    result = _baseline(tiny_model, "sampler.num_iter=4", "backend.dtype=bfloat16").generate(labels=[1, 2], seed=0)
    assert result.report["backend"]["dtype"] == "bfloat16" and torch.isfinite(result.tokens).all()
    err = rel_err(result.tokens, fp32)
    assert 0 < err < 0.2  # autocast changes the numbers, not the sample


def test_clip_denoised_bounds_the_predicted_start(tiny_model):
    free = _baseline(tiny_model, "sampler.num_iter=3").generate(labels=[1], seed=0).tokens
    clipped = _baseline(tiny_model, "sampler.num_iter=3", "sampler.clip_denoised=true").generate(labels=[1], seed=0)
    assert clipped.report["sampler"]["clip_denoised"] is True
    # the last reverse step returns the (clamped) mean at t=0: a convex mix of values in [-1, 1] and x_1
    assert clipped.tokens.abs().max() < free.abs().max()
    assert tiny_model.diffloss.clip_denoised is True
    _baseline(tiny_model, "sampler.num_iter=3").generate(labels=[1], seed=0)
    assert tiny_model.diffloss.clip_denoised is False  # set per run from the settings, not sticky
