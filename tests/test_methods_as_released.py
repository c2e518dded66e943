"""The methods as released: each behaviour of liebenxj/ReCAP (examples/MAR+ReCAP), feihongyan1/LazyMAR
and the GtR paper that marcache reproduces (by default or as an option) is pinned here on a tiny model.

The released samplers' logic is re-stated in plain Python below (written from reading the release,
not copied) and compared with what marcache's plugins make the loop do.
"""

import math

import pytest
import torch

from conftest import make_tiny, rel_err
from marcache.hookspecs import hookimpl
from marcache.models.partial import CachedPass, FeatureCache, TokenSelection, _select, cached_forward
from marcache.plugin import Plugin
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.plugins.cosine_schedule import cosine_tokens_per_step
from marcache.plugins.gtr import GtRScheduleConfig, gtr_plan
from marcache.plugins.lazymar_head import LazyMARHeadCache, LazyMARHeadConfig
from marcache.plugins.recap import ReCAPConfig, local_token_count
from marcache.policy import load_policy, resolve_policy
from marcache.scheduler import Sampler

from test_lazymar_head import chain_inputs, head_outputs


class StepWatcher(Plugin):
    name = "release_step_watcher"
    families = frozenset({"accounting"})

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = []

    @hookimpl
    def marcache_step_end(self, step, record):
        self.steps.append(step)


def run(model, plugins, num_iter=8, labels=(1, 2, 3, 4), seed=3, cfg=3.0):
    policy = resolve_policy({"sampler": {"num_iter": num_iter, "cfg": cfg, "head_steps": 3},
                             "plugins": plugins, "disable": ["flop_counter"]})
    watcher = StepWatcher()
    result = Sampler(model, policy, extra_plugins=[watcher]).generate(labels=list(labels), seed=seed)
    return result, watcher.steps


# ---------------------------------------------------------------------------- ReCAP
def released_recap_positions(order: list[int], num_iter: int, seq_len: int, pre_full: int, k: int = 1) -> list[list[int]]:
    """Positions each step of the released ReCAP loop decodes for one sample, given its order.

    The release computes the group's mask lengths (cosine, clamped as MAR does), lists the group's
    targets with ``torch.where`` (ascending raster position), and lets the Full-FE take the first
    ``n_0`` of them and each Local-FE the next ones."""
    masked, it, out = seq_len, 0, []
    while it < num_iter:
        lens = []
        for i in range(k * (it >= pre_full) + 1):
            ratio = (it + 1 + i) / num_iter
            if ratio == 1.0:
                lens.append(0)
                break
            length = math.floor(seq_len * math.cos(math.pi / 2 * ratio))
            lens.append(max(1, min((masked if i == 0 else lens[-1]) - 1, length)))
        targets = sorted(order[lens[-1]:masked])  # masked = the first `masked` entries of the order
        sizes = [masked - lens[0]] + [a - b for a, b in zip(lens, lens[1:])]
        start = 0
        for size in sizes:
            out.append(targets[start:start + size])
            start += size
        it, masked = it + len(sizes), lens[-1]
    return out


@pytest.fixture(scope="module")
def recap_model():
    return make_tiny(4, encoder_depth=2, decoder_depth=2)


@pytest.mark.parametrize("num_iter", [8, 10])
def test_recap_raster_split_is_the_released_one(recap_model, num_iter):
    base, base_steps = run(recap_model, [], num_iter)
    orders = base_steps[0].gen.orders  # the random order, before ReCAP refines it
    _, steps = run(recap_model, [{"name": "recap"}], num_iter)
    _, order_steps = run(recap_model, [{"name": "recap", "params": {"group_split": "order"}}], num_iter)
    differs = False
    for row in range(orders.shape[0]):
        expected = released_recap_positions(orders[row].tolist(), num_iter, recap_model.seq_len, num_iter // 2)
        ours = [s.mask_to_pred[row].nonzero().flatten().tolist() for s in steps]
        assert ours == expected
        by_order = [s.mask_to_pred[row].nonzero().flatten().tolist() for s in order_steps]
        official = [s.mask_to_pred[row].nonzero().flatten().tolist() for s in base_steps]
        assert by_order == official  # group_split: order keeps the order's split
        differs |= by_order != ours
    assert differs  # the two splits really decode different tokens at some step


def test_recap_final_step_gets_full_guidance(recap_model):
    _, base = run(recap_model, [], 8)
    _, release = run(recap_model, [{"name": "recap"}], 8)
    _, schedule = run(recap_model, [{"name": "recap", "params": {"final_step_cfg": "schedule"}}], 8)
    L = recap_model.seq_len
    assert [s.cfg_scale for s in schedule] == [s.cfg_scale for s in base]
    assert [s.cfg_scale for s in release[:-1]] == [s.cfg_scale for s in base[:-1]]
    assert base[-1].cfg_scale == linear_cfg_scale(3.0, L, 1) < release[-1].cfg_scale == linear_cfg_scale(3.0, L, 0)
    assert release[-1].cfg_scale == pytest.approx(3.0)
    policy = resolve_policy({"sampler": {"num_iter": 8, "cfg": 3.0, "cfg_schedule": "constant", "head_steps": 3},
                             "plugins": [{"name": "recap"}], "disable": ["flop_counter"]})
    report = Sampler(recap_model, policy).generate(labels=[1], seed=0).report
    assert {s["cfg_scale"] for s in report["steps"]} == {3.0}  # only the linear schedule is affected


@pytest.mark.parametrize("num_iter, local", [(96, 90), (84, 88), (56, 91), (36, 89), (128, 89), (48, 92)])
def test_recap_local_tokens_at_released_configs(num_iter, local):
    """88-92 of 256 tokens are decoded in Local-FEs at every released MAR configuration (not 1/4)."""
    released = [len(p) for p in released_recap_positions(list(range(256)), num_iter, 256, num_iter // 2)]
    assert released == cosine_tokens_per_step(256, num_iter)  # grouping keeps MAR's token counts
    assert local_token_count(released, ReCAPConfig()) == local


def test_recap_report_says_what_ran(recap_model):
    result, _ = run(recap_model, [{"name": "recap"}], 8)
    section = result.report["engagement"]["recap"]
    assert section["group_split"] == "raster" and section["final_step_cfg"] == "release"
    assert 0 < section["local_token_fraction"] < 0.5 and section["groups_raster_split"] == 2 * 4


# ---------------------------------------------------------------------------- LazyMAR token cache
def test_forced_positions_scored_zero_can_be_displaced():
    """Selection at the selection layer: forced positions unchanged since the last pass (cos = 1),
    one free position turned around (cos = -1). Ranked below every cosine (marcache) the forced ones
    are all kept; scored 0 (release) the turned-around position displaces one of them."""
    heads, p, hd = 2, 6, 4
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(1, heads, p, hd, generator=g)
    now = prev.clone()
    now[:, :, 5] = -prev[:, :, 5]  # position 5: cosine -1
    now[:, :, 4] = prev[:, :, 4] + 0.1 * torch.randn(1, heads, hd, generator=g)  # slightly changed
    forced = torch.tensor([[False, True, True, False, False, False]])
    cache = FeatureCache()
    cache.dec_k = torch.zeros(1, 1, heads, p, hd)
    positions = torch.arange(p).unsqueeze(0)
    picks = {}
    for score in (-2.0, 0.0):
        cache.sel_v = prev.clone()
        picks[score] = _select(now, positions, cache, slice(0, 1), 2, forced, score)[0].tolist()
    assert picks[-2.0] == [1, 2]
    assert 5 in picks[0.0] and len(set(picks[0.0]) & {1, 2}) == 1


def test_release_token_cache_options_reach_the_pass(recap_model):
    seen = []

    class Spy(Plugin):
        name = "release_plan_spy"
        families = frozenset({"features"})

        @hookimpl(trylast=True)
        def marcache_forward_plan(self, step, plan):
            if plan.spec is not None and plan.spec.selection is not None and plan.spec.encoder_queries is not None:
                seen.append((plan.spec.selection.forced_score, plan.spec.selection.zero_unselected, plan.cache.exact_fresh_kv))

    for params, expected in (({}, (-2.0, False, True)), ({"forced_score": "zero", "round_fresh_kv": True}, (0.0, True, False))):
        seen.clear()
        policy = resolve_policy({"sampler": {"num_iter": 8, "cfg": 3.0, "head_steps": 3}, "disable": ["flop_counter"],
                                 "plugins": [{"name": "lazymar_token_cache", "params": {"warmup_steps": 2, "refresh_interval": 3, **params}}]})
        Sampler(recap_model, policy, extra_plugins=[Spy()]).generate(labels=[1, 2], seed=0)
        assert seen and set(seen) == {expected}


@torch.no_grad()
def test_fresh_kv_rounded_like_the_fp16_cache(recap_model):
    """With ``exact_fresh_kv`` off a full pass over an fp16 cache equals the official forward with every
    attention's K/V rounded to fp16 (what the released code computes under autocast)."""
    model = recap_model
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, model.seq_len, model.token_embed_dim, generator=g)
    mask = torch.zeros(2, model.seq_len)
    mask[:, 3:9] = 1
    ce = model.class_emb(torch.tensor([1, 2]))

    def pass_(exact):
        cache = FeatureCache(dtype=torch.float16, exact_fresh_kv=exact)
        cache.allocate(model, 2, "cpu")
        return cached_forward(model, tokens, mask, ce, cache, CachedPass(), slice(0, 2), 6).clone()

    blocks = list(model.encoder_blocks) + list(model.decoder_blocks)
    originals = [b.attn.project_qkv for b in blocks]

    def rounded(fn):
        def project(x):
            q, k, v = fn(x)
            return q, k.half().float(), v.half().float()
        return project

    def official():
        h = model.decoder_input(model.forward_mae_encoder(tokens, mask, ce), mask)
        for block in model.decoder_blocks:
            h = block(h)
        return h

    exact_ref = official()
    for b, fn in zip(blocks, originals):
        b.attn.project_qkv = rounded(fn)
    try:
        rounded_ref = official()
    finally:
        for b in blocks:
            del b.attn.project_qkv
    assert rel_err(pass_(True), exact_ref) < 1e-6
    assert rel_err(pass_(False), rounded_ref) < 1e-6
    assert rel_err(rounded_ref, exact_ref) > 1e-6  # the rounding is visible


def test_release_policy_runs_and_reports(recap_model):
    shipped = load_policy("lazymar_release").to_dict()
    policy = resolve_policy({**shipped, "disable": ["flop_counter"]},  # FLOP pricing is not under test here
                            overrides=["sampler.num_iter=8", "sampler.head_steps=3", "lazymar_token_cache.warmup_steps=2",
                                       "lazymar_cond_cache.warmup_steps=2", "lazymar_token_cache.refresh_interval=3",
                                       "lazymar_cond_cache.refresh_interval=3", "lazymar_head.skip_blocks=[1]"])
    result = Sampler(recap_model, policy).generate(labels=[1, 2], seed=0)
    assert torch.isfinite(result.tokens).all()
    section = result.report["engagement"]["lazymar_token_cache"]
    assert section["lazy_steps"] > 0 and "predicted_displaced" in section


# ---------------------------------------------------------------------------- LazyMAR head thresholds
def release_chain(diffloss, z, noise, temperature, cfg, steps, block_interval, cfg_interval, skip, mlp_above=0.9):
    """The released head with separate thresholds, restated: CFG-full steps (``i % cfg_interval``) run
    both halves and refresh delta; block-full steps (``i % block_interval``) run every block and store
    what they computed on the rows they ran; caches on other rows are cut or repeated."""
    net, sched, c, n = diffloss.net, diffloss.schedule(steps), diffloss.in_channels, noise.shape[0]
    x, res, mlp = noise[:, 0], {}, {}

    def fit(t, rows):
        return t[:rows] if len(t) > rows else torch.cat([t, t]) if len(t) < rows else t

    for j, i in enumerate(range(steps - 1, -1, -1)):
        cfg_full = i == steps - 1 or i % cfg_interval == 0
        block_full = i == steps - 1 or i % block_interval == 0
        xx, zz = (torch.cat([x, x]), z) if cfg_full else (x, z[:n])
        y = net.time_embed(sched.timestep_map[torch.full((len(xx),), i)]) + net.cond_embed(zz)
        h = net.input_proj(xx)
        for b, blk in enumerate(net.res_blocks):
            shift, scale, gate = blk.adaLN_modulation(y).chunk(3, dim=-1)
            if block_full or (b not in skip and i > mlp_above * steps):
                mlp[b] = blk.mlp(blk.in_ln(h) * (1 + scale) + shift)
                out = h + gate * mlp[b]
                res[b] = out - h
                h = out
            elif b in skip:
                h = h + fit(res[b], len(h))
            else:
                h = h + gate * fit(mlp[b], len(h))
        out = net.final_layer(h, y)
        if cfg_full:
            delta = out[:n, :c] - out[n:, :c]
        eps_c = out[:n, :c]
        out = torch.cat([(eps_c - delta) + cfg * delta, out[:n, c:]], 1)
        st = sched.p_mean_variance_from_output(out, x, torch.full((n,), i))
        x = st["mean"] + (1.0 if i else 0.0) * torch.exp(0.5 * st["log_variance"]) * noise[:, 1 + j] * temperature
    return x


@pytest.mark.parametrize("block_interval, cfg_interval", [(7, 7), (7, 3), (3, 7)])
def test_head_thresholds_as_released(block_interval, cfg_interval):
    diffloss, z, noise = chain_inputs(cfg=3.0)
    config = LazyMARHeadConfig(refresh_interval=block_interval, cfg_refresh_interval=cfg_interval, scale_with_head_steps=False)
    expected, expected_outs = head_outputs(diffloss, 100, lambda: release_chain(diffloss, z, noise, 0.8, 3.0, 100, block_interval,
                                                                                cfg_interval, {1, 2, 3, 4}))
    ex = LazyMARHeadCache(config)
    out, outs = head_outputs(diffloss, 100, lambda: ex.sample(diffloss, z, noise, 0.8, 3.0, steps=100))
    assert (outs - expected_outs).abs().max() < 1e-4
    off = ex.counter.get("cfg_steps_off_block_schedule", 0)
    assert (off == 0) == (block_interval == cfg_interval)
    rows = ex.module_rows(100, 3, True, 6)
    cfg_full = sum(1 for i in range(100) if i == 99 or i % cfg_interval == 0)
    assert rows["final"] == 3 * (100 + cfg_full)  # n rows per step, 2n at CFG-full ones


def test_default_cfg_threshold_follows_the_block_one():
    diffloss, z, noise = chain_inputs(cfg=3.0)
    a = LazyMARHeadCache(LazyMARHeadConfig()).sample(diffloss, z, noise, 0.8, 3.0, steps=60)
    b = LazyMARHeadCache(LazyMARHeadConfig(cfg_refresh_interval=7)).sample(diffloss, z, noise, 0.8, 3.0, steps=60)
    assert torch.equal(a, b)  # both rescaled alike: round(7 * 60 / 100) = 4


# ---------------------------------------------------------------------------- GtR
def test_gtr_paper_and_calibrated_policies():
    def stage_steps(name):
        params = next(p.params for p in load_policy(name).config.plugins if p.name == "gtr_schedule")
        _, stage_of_step = gtr_plan(16, 16, GtRScheduleConfig(**params))
        return [stage_of_step.count(k) for k in range(3)]

    assert stage_steps("gtr_paper") == stage_steps("gtr_fts_paper") == [24, 6, 2]  # the paper's literal rates
    assert stage_steps("gtr") == stage_steps("gtr_fts") == [14, 4, 1]  # calibrated to the published 17.34 T
