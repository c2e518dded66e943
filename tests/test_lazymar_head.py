"""LazyMAR diffusion-head caches (plugins/lazymar_head.py): identity, the released schedule, real reuse,
agreement with an independent implementation of the spec, guidance off, batch invariance, validation."""

import functools

import pytest
import torch

from conftest import make_tiny
from marcache.errors import ConfigError
from marcache.models.diffloss import modulate
from marcache.plugins.lazymar_head import (CACHED, CACHED_MLP, FULL, LazyMARHead, LazyMARHeadCache, LazyMARHeadConfig,
                                           head_step_kinds)
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler

RELEASED_FULL = [99, 98] + list(range(91, -1, -7))  # i == 99 or i % 7 == 0
IDENTITY = dict(refresh_interval=1, skip_blocks=[], mlp_reuse_threshold=0.0)


def randomize_head(net, seed=0, gate=0.5, input_scale=1e-3):
    """Random head weights. The official adaLN-zero init makes every block the identity and the output
    zero, under which any cache would look exact. The input projection is kept small: a random head's
    epsilon never matches x_T, 1/sqrt(alpha_bar) at t = 999 amplifies the mismatch and the chain grows
    to ~1e5, and a full-scale projection of such an x_t would swamp every block's contribution (hiding
    block-level errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear):
                scale = gate if "adaLN" in name else input_scale if name == "input_proj" else 1.0
                mod.weight.copy_(scale * torch.randn(mod.weight.shape, generator=g) / mod.weight.shape[1] ** 0.5)
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return net


@functools.lru_cache(maxsize=None)
def head_model():
    """2x2 tokens, a 6-block head (the released skip set 1-4 fits), random head weights."""
    model = make_tiny(2, diffloss_d=6, num_sampling_steps="100")
    randomize_head(model.diffloss.net)
    return model


def rel(a, b):
    """Max abs difference relative to the scale of ``b`` (random heads drive chains to ~1e4)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def chain_inputs(n=3, cfg=3.0, steps=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    model = head_model()
    z = torch.randn((2 if cfg != 1.0 else 1) * n, model.diffloss.net.cond_embed.in_features, generator=g)
    noise = torch.randn(n, steps + 1, model.token_embed_dim, generator=g)
    return model.diffloss, z, noise


def policy(params=None, *overrides):
    """The plugin with ``params`` (None: the baseline), 2 MAR steps, 100 head steps. FLOP pricing is
    dropped: tracing each new shape costs seconds and is not under test here."""
    plugins = [] if params is None else [{"name": "lazymar_head", "params": params}]
    return resolve_policy({"sampler": {"num_iter": 2, "cfg": 3.0, "head_steps": 100}, "plugins": plugins,
                           "disable": ["flop_counter"]}, overrides=list(overrides))


# ---------------------------------------------------------------------------- 1) identity
@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_every_step_full_is_the_plain_chain(cfg):
    diffloss, z, noise = chain_inputs(cfg=cfg)
    expected = diffloss.sample_with_noise(z, noise, 0.9, cfg, steps=100)
    for params in (IDENTITY, dict(refresh_interval=1)):  # with every step full, skip/MLP settings never apply
        out = LazyMARHeadCache(LazyMARHeadConfig(**params)).sample(diffloss, z, noise, 0.9, cfg, steps=100)
        assert rel(out, expected) < 1e-6


def test_identity_setting_through_the_sampler():
    model = head_model()
    ours = Sampler(model, policy(IDENTITY)).generate(labels=[3, 7], seed=0)
    ref = Sampler(model, policy()).generate(labels=[3, 7], seed=0).tokens
    assert rel(ours.tokens, ref) < 1e-6
    section = ours.report["engagement"]["lazymar_head"]
    assert section["full_head_steps"] == 2 * 100 and section.get("cached_head_steps", 0) == 0  # 2 MAR steps, one chain each
    assert "lazymar_head" not in ours.report["never_engaged"]


# ---------------------------------------------------------------------------- 2) released schedule
def test_released_schedule_by_instrumenting_the_head():
    diffloss, z, noise = chain_inputs(n=2)
    net, sched = diffloss.net, diffloss.schedule(100)
    current, ran = {}, {"skipped_mlp": [], "kept_mlp": [], "kept_adaln": [], "rows": []}
    original = sched.timestep_map.tolist()
    def hook(fn):
        def run(module, args, output):
            fn(args, output)  # returns None: a forward hook's return value would replace the output
        return run

    hooks = [
        net.time_embed.register_forward_hook(hook(lambda a, o: current.update(i=original.index(int(a[0][0]))))),
        net.res_blocks[1].mlp.register_forward_hook(hook(lambda a, o: (ran["skipped_mlp"].append(current["i"]), ran["rows"].append(len(o))))),
        net.res_blocks[5].mlp.register_forward_hook(hook(lambda a, o: ran["kept_mlp"].append(current["i"]))),
        net.res_blocks[0].adaLN_modulation.register_forward_hook(hook(lambda a, o: ran["kept_adaln"].append((current["i"], len(o))))),
    ]
    plugin = LazyMARHead()
    try:
        plugin.executor.sample(diffloss, z, noise, 1.0, 3.0, steps=100)
    finally:
        for h in hooks:
            h.remove()
    assert len(RELEASED_FULL) == 16
    # a skipped block runs only at full head steps, on both CFG halves
    assert ran["skipped_mlp"] == RELEASED_FULL and set(ran["rows"]) == {4}
    # kept blocks: MLP at full steps and while i > 90 (92..97); modulation every step, cond rows only when cached
    assert sorted(ran["kept_mlp"], reverse=True) == sorted(RELEASED_FULL + list(range(92, 98)), reverse=True)
    assert [i for i, _ in ran["kept_adaln"]] == list(range(99, -1, -1))
    assert all(rows == (4 if i in RELEASED_FULL else 2) for i, rows in ran["kept_adaln"])
    kinds = head_step_kinds(100, LazyMARHeadConfig())
    assert kinds.count(FULL) == 16 and kinds.count(CACHED_MLP) == 6 and kinds.count(CACHED) == 78
    e = plugin.engagement
    assert (e["full_head_steps"], e["cached_head_steps"], e["blocks_skipped"]) == (16, 84, 84 * 4)
    assert (e["mlp_recomputed"], e["mlp_reused"]) == (6 * 2, 78 * 2)
    report = plugin.report_section()
    assert report["effective_schedules"]["100"]["full_steps"] == RELEASED_FULL
    assert report["params"]["skip_blocks"] == [1, 2, 3, 4]


def test_schedule_scales_with_head_steps():
    cfg = LazyMARHeadConfig()
    full = lambda t, c=cfg: [i for i, k in zip(range(t - 1, -1, -1), head_step_kinds(t, c)) if k == FULL]
    assert full(50) == [49, 48] + list(range(44, -1, -4))  # interval round(3.5) = 4
    assert full(20) == list(range(19, -1, -1))  # interval round(1.4) = 1: every step full
    assert full(20, LazyMARHeadConfig(scale_with_head_steps=False)) == [19, 14, 7, 0]
    assert head_step_kinds(50, cfg).count(CACHED_MLP) == 2  # i = 46, 47 (> 45)
    assert full(100, LazyMARHeadConfig(refresh_interval=10, reference_head_steps=200)) == [99] + list(range(95, -1, -5))


# ---------------------------------------------------------------------------- 3) reuse, analytically
def test_cached_step_reuses_rather_than_recomputes():
    """One full pass at (t1, x1) then one cached pass at (t2, x2): skipped blocks add the residual of t1,
    kept blocks use gate(t2) times the MLP output of t1; a fresh pass gives something else."""
    model = make_tiny(2, diffloss_d=3)
    net = randomize_head(model.diffloss.net, seed=3, gate=1.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, net.cond_embed.in_features, generator=g)
    x1, x2 = torch.randn(2, net.in_channels, generator=g), torch.randn(2, net.in_channels, generator=g)
    y1 = net.time_embed(torch.tensor([900])) + net.cond_embed(z)
    y2 = net.time_embed(torch.tensor([300])) + net.cond_embed(z)
    skip, residual, mlp_out = {1}, {}, {}
    with torch.no_grad():
        full = LazyMARHeadCache._trunk(net, x1, y1, skip, residual, mlp_out)
        assert torch.equal(full, net.forward_embedded(x1, y1))
        cached = LazyMARHeadCache._trunk_cached(net, x2, y2, skip, residual, mlp_out, recompute_mlp=False)
        fresh = net.forward_embedded(x2, y2)

        # by hand: block 0 and 2 keep their t1 MLP output under the t2 gate, block 1 its t1 residual
        def block_parts(block, h, y):
            shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
            return gate, block.mlp(modulate(block.in_ln(h), shift, scale))

        h1 = [net.input_proj(x1)]
        for block in net.res_blocks:
            h1.append(block(h1[-1], y1))
        mlp_t1 = [block_parts(b, h, y1)[1] for b, h in zip(net.res_blocks, h1)]
        h = net.input_proj(x2)
        h = h + block_parts(net.res_blocks[0], h, y2)[0] * mlp_t1[0]
        h = h + (h1[2] - h1[1])
        h = h + block_parts(net.res_blocks[2], h, y2)[0] * mlp_t1[2]
        expected = net.final_layer(h, y2)
    assert torch.allclose(cached, expected, atol=1e-6)
    assert (cached - fresh).abs().max() > 1e-2  # reuse is visible: cached differs from recomputation
    with torch.no_grad():  # with the MLP recomputed, only the skipped block's residual is stale
        again = LazyMARHeadCache._trunk_cached(net, x2, y2, {1}, residual, mlp_out, recompute_mlp=True)
        h = net.input_proj(x2)
        h = net.res_blocks[0](h, y2) + (h1[2] - h1[1])
        assert torch.allclose(again, net.final_layer(net.res_blocks[2](h, y2), y2), atol=1e-6)
        assert torch.allclose(mlp_out[2], block_parts(net.res_blocks[2], h, y2)[1], atol=1e-6)  # cache refreshed


def spec_chain(diffloss, z, noise, temperature, cfg, steps, interval=7, skip=(1, 2, 3, 4), mlp_above=0.9):
    """methods.md §1.5 written independently: full steps through ``ResBlock.forward`` with hooks
    capturing each block's input/output and MLP output; cached steps composed by hand."""
    net, sched, c, n = diffloss.net, diffloss.schedule(steps), diffloss.in_channels, noise.shape[0]
    guided, x = cfg != 1.0, noise[:, 0]
    cache = {"res": {}, "mlp": {}}
    hooks = [blk.register_forward_hook(lambda m, a, o, b=b: cache["res"].__setitem__(b, (o - a[0])[:n]))
             for b, blk in enumerate(net.res_blocks)]
    hooks += [blk.mlp.register_forward_hook(lambda m, a, o, b=b: cache["mlp"].__setitem__(b, o[:n]))
              for b, blk in enumerate(net.res_blocks)]
    try:
        for j, i in enumerate(range(steps - 1, -1, -1)):
            t = torch.full((n,), i)
            temb = net.time_embed(sched.timestep_map[t[:1]])
            if i == steps - 1 or i % interval == 0:
                zz, xx = (z, torch.cat([x, x])) if guided else (z, x)
                out = net.forward_embedded(xx, temb + net.cond_embed(zz))
                if guided:
                    eps_c, eps_u = out[:n, :c], out[n:, :c]
                    delta = eps_c - eps_u
                    out = torch.cat([eps_c + (cfg - 1) * delta, out[:n, c:]], 1)  # = eps_u + cfg (eps_c - eps_u)
            else:
                y = temb + net.cond_embed(z[:n])
                h = net.input_proj(x)
                for b, blk in enumerate(net.res_blocks):
                    if b in skip:
                        h = h + cache["res"][b]
                    elif i > mlp_above * steps:
                        h = blk(h, y)  # hooks refresh the MLP cache
                    else:
                        gate = blk.adaLN_modulation(y).chunk(3, dim=-1)[2]
                        h = h + gate * cache["mlp"][b]
                out = net.final_layer(h, y)
                if guided:
                    out = torch.cat([out[:, :c] + (cfg - 1) * delta, out[:, c:]], 1)
            st = sched.p_mean_variance_from_output(out, x, t)
            x = st["mean"] + (1.0 if i else 0.0) * torch.exp(0.5 * st["log_variance"]) * noise[:, 1 + j] * temperature
    finally:
        for hk in hooks:
            hk.remove()
    return x


def head_outputs(diffloss, steps, run):
    """``run()``'s result and the guided network output ``[T, N, 2C]`` of each of its head steps."""
    sched, outs = diffloss.schedule(steps), []
    original = sched.p_mean_variance_from_output

    def recording(out, x, t, clip_denoised=False):
        outs.append(out.detach().clone())
        return original(out, x, t, clip_denoised)

    sched.p_mean_variance_from_output = recording
    try:
        with torch.no_grad():
            result = run()
    finally:
        del sched.p_mean_variance_from_output
    return result, torch.stack(outs)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_released_chain_matches_independent_spec(cfg):
    diffloss, z, noise = chain_inputs(cfg=cfg)
    expected, expected_outs = head_outputs(diffloss, 100, lambda: spec_chain(diffloss, z, noise, 0.8, cfg, 100))
    plain, plain_outs = head_outputs(diffloss, 100, lambda: diffloss.sample_with_noise(z, noise, 0.8, cfg, steps=100))
    ex = LazyMARHeadCache(LazyMARHeadConfig())
    out, outs = head_outputs(diffloss, 100, lambda: ex.sample(diffloss, z, noise, 0.8, cfg, steps=100))
    # every head step's (guided) output agrees: errors in delta, skipping or MLP reuse show up >= 1e-2 here
    assert (outs - expected_outs).abs().max() < 1e-4
    assert rel(out, expected) < 1e-5
    # 4) finite, not the plain chain, and loosely close to it
    assert torch.isfinite(out).all()
    assert (outs - plain_outs).abs().max() > 1e-2
    assert 1e-7 < rel(out, plain) < 0.05


# ---------------------------------------------------------------------------- 4, 5) whole generations
@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_generation_cached_is_finite_and_close(cfg):
    model = head_model()
    result = Sampler(model, policy({}, f"sampler.cfg={cfg}")).generate(labels=[1, 5], seed=2)
    ref = Sampler(model, policy(None, f"sampler.cfg={cfg}")).generate(labels=[1, 5], seed=2).tokens
    assert torch.isfinite(result.tokens).all()
    assert 1e-7 < rel(result.tokens, ref) < 0.05
    section = result.report["engagement"]["lazymar_head"]
    assert section["cached_head_steps"] == 2 * 84 and section["effective_schedules"]["100"]["refresh_interval"] == 7


def test_batch_invariance():
    sampler = Sampler(head_model(), policy({}, "sampler.head_steps=30"))
    labels = [0, 4, 9]
    batched = sampler.generate(labels=labels, seed=5, batch_size=3).tokens
    single = torch.cat([sampler.generate(labels=[lab], seed=5, sample_offset=i).tokens for i, lab in enumerate(labels)])
    assert rel(batched, single) < 1e-5


# ---------------------------------------------------------------------------- 6) validation
def test_skip_blocks_must_exist_in_the_head():
    with pytest.raises(ConfigError, match=r"lazymar_head\.skip_blocks=\[1, 2, 3, 4\]: block 2 does not exist.*2 blocks") as exc:
        Sampler(make_tiny(2), policy({}))  # mar_tiny: 2 head blocks
    assert "\n" not in str(exc.value)
    Sampler(make_tiny(2), policy({"skip_blocks": [1]}))  # a choice that fits is accepted


@pytest.mark.parametrize("params, key", [
    ({"refresh_interval": 0}, "refresh_interval=0"),
    ({"skip_blocks": [1, 1]}, "skip_blocks"),
    ({"skip_blocks": [-1]}, "skip_blocks"),
    ({"mlp_reuse_threshold": 1.5}, "mlp_reuse_threshold"),
    ({"reference_head_steps": 1}, "reference_head_steps"),
    ({"refresh_every": 7}, "refresh_every"),
])
def test_bad_params_are_one_line_errors(params, key):
    with pytest.raises(ConfigError, match=key) as exc:
        resolve_policy({"plugins": [{"name": "lazymar_head", "params": params}]})
    assert "\n" not in str(exc.value) and "plugins[0].params" in str(exc.value)
