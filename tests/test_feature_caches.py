"""The partial-pass mechanism, LazyMAR's token and condition caches, and ReCAP."""

import pytest
import torch

from conftest import make_tiny, rel_err
from marcache.caching import feature_cache_of
from marcache.errors import ConfigError
from marcache.hookspecs import hookimpl
from marcache.models.partial import CachedPass, FeatureCache, TokenSelection, cached_forward
from marcache.plugin import Plugin
from marcache.plugins.lazymar import RELEASED_KEEP_RATIOS, is_full_step, keep_ratio
from marcache.plugins.recap import ReCAPConfig, step_kind
from marcache.policy import load_policy, resolve_policy
from marcache.scheduler import Sampler


@pytest.fixture(scope="module")
def model():
    return make_tiny(4, encoder_depth=3, decoder_depth=5)


def official_prenorm(model, tokens, mask, class_emb):
    h = model.decoder_input(model.forward_mae_encoder(tokens, mask, class_emb), mask)
    for block in model.decoder_blocks:
        h = block(h)
    return h


MASKED = 10  # masked positions per row in random_state


def random_state(model, b=3, masked=MASKED, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, model.seq_len, model.token_embed_dim, generator=g)
    mask = torch.zeros(b, model.seq_len)
    for i in range(b):
        mask[i, torch.randperm(model.seq_len, generator=g)[:masked]] = 1
    return tokens, mask, model.class_emb(torch.arange(b))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_pass_equals_official_forward(model, dtype):
    tokens, mask, ce = random_state(model)
    cache = FeatureCache(dtype=dtype)
    cache.allocate(model, 3, "cpu")
    out = cached_forward(model, tokens, mask, ce, cache, CachedPass(), slice(0, 3), MASKED)
    assert rel_err(out, official_prenorm(model, tokens, mask, ce)) < 1e-6


@torch.no_grad()
def test_zero_staleness_partial_pass_equals_full(model):
    """Queries over freshly cached K/V reproduce the full pass exactly at the query positions."""
    tokens, mask, ce = random_state(model, seed=1)
    cache = FeatureCache()
    cache.allocate(model, 3, "cpu")
    full = cached_forward(model, tokens, mask, ce, cache, CachedPass(), slice(0, 3), MASKED).clone()
    buf = model.buffer_size
    present = (model.with_buffer(mask) == 0).nonzero(as_tuple=True)[1].reshape(3, -1)
    group = torch.tensor([[buf + 1, buf + 5, buf + 9]] * 3)
    spec = CachedPass(encoder_queries=present[:, :buf + 2], decoder_queries=torch.cat([torch.arange(buf).expand(3, -1), group], 1))
    local = cached_forward(model, tokens, mask, ce, cache, spec, slice(0, 3), MASKED)
    assert rel_err(local[:, buf:][:, [1, 5, 9]], full[:, buf:][:, [1, 5, 9]]) < 1e-6


@torch.no_grad()
def test_selection_keeps_forced_and_most_changed(model):
    tokens, mask, ce = random_state(model, seed=2)
    cache = FeatureCache()
    cache.allocate(model, 3, "cpu")
    p = model.buffer_size + model.seq_len
    cached_forward(model, tokens, mask, ce, cache, CachedPass(selection=TokenSelection(2, p, torch.zeros(3, p, dtype=torch.bool))), slice(0, 3), MASKED)
    tokens2 = tokens.clone()
    tokens2[:, 3] += 5.0  # a large change at token 3 (if visible) moves many values
    forced = torch.zeros(3, p, dtype=torch.bool)
    forced[:, model.buffer_size + 7] = True
    cached_forward(model, tokens2, mask, ce, cache, CachedPass(selection=TokenSelection(2, 6, forced)), slice(0, 3), MASKED)
    kept = cache.last_decoder_positions
    assert kept.shape == (3, 6)
    assert torch.all((kept == model.buffer_size + 7).any(dim=1))
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # sorted, distinct


def test_released_step_types_and_keep_table():
    full = [s for s in range(64) if is_full_step(s, 5, 9)]
    assert full == [0, 1, 2, 3, 4, 5, 14, 23, 32, 41, 50, 59]
    assert [keep_ratio(RELEASED_KEEP_RATIOS, s, 64) for s in range(64)] == RELEASED_KEEP_RATIOS
    assert [int(320 * r) for r in (keep_ratio(RELEASED_KEEP_RATIOS, s, 64) for s in (19, 20, 21, 25, 30, 35, 40))] == [320, 192, 160, 128, 48, 38, 16]
    # other step counts stretch the table by progress
    assert keep_ratio(RELEASED_KEEP_RATIOS, 10, 32) == RELEASED_KEEP_RATIOS[20]


class CacheWatcher(Plugin):
    name = "test_cache_watcher"
    families = frozenset({"accounting"})

    def __init__(self):
        super().__init__()
        self.kept = []

    @hookimpl
    def marcache_step_end(self, step, record):
        cache = feature_cache_of(step.store)
        positions = getattr(cache, "last_decoder_positions", None) if cache is not None else None
        self.kept.append((step.mask_to_pred.clone(), step.prev_mask_to_pred.clone(), positions))
        self.engagement["steps"] += 1


def lazymar_policy(warmup, refresh, dtype="float32", cond=True, **sampler):
    plugins = [{"name": "lazymar_token_cache", "params": {"warmup_steps": warmup, "refresh_interval": refresh, "cache_dtype": dtype}}]
    if cond:
        plugins.append({"name": "lazymar_cond_cache", "params": {"warmup_steps": warmup, "refresh_interval": refresh}})
    return resolve_policy({"sampler": {"num_iter": 10, "head_steps": 4, **sampler}, "plugins": plugins})


def baseline(model, **sampler):
    return Sampler(model, resolve_policy({"sampler": {"num_iter": 10, "head_steps": 4, **sampler}}))


def test_lazymar_every_step_full_equals_baseline(model):
    expected = baseline(model).generate(labels=[1, 4], seed=3).tokens
    got = Sampler(model, lazymar_policy(1, 1)).generate(labels=[1, 4], seed=3).tokens
    assert rel_err(got, expected) < 1e-6


def test_lazymar_recomputes_predicted_tokens_and_differs(model):
    watcher = CacheWatcher()
    result = Sampler(model, lazymar_policy(2, 4, "float16"), extra_plugins=[watcher]).generate(labels=[1, 4], seed=3)
    buf = model.buffer_size
    lazy = 0
    for step_index, (pred, prev, kept) in enumerate(watcher.kept):
        if is_full_step(step_index, 2, 4):
            continue
        lazy += 1
        for row in range(2):
            needed = set((pred[row] | prev[row]).nonzero().flatten().add(buf).tolist())
            assert needed <= set(kept[row].tolist()), "this and last step's tokens must be recomputed"
    assert lazy == 6
    expected = baseline(model).generate(labels=[1, 4], seed=3).tokens
    assert torch.isfinite(result.tokens).all() and rel_err(result.tokens, expected) > 1e-4
    eng = result.report["engagement"]
    assert eng["lazymar_token_cache"]["lazy_steps"] == 6 and eng["lazymar_cond_cache"]["cond_only_steps"] == 6
    assert result.report["cache_peak_bytes"]["features"] > 0 and result.report["cache_peak_bytes"]["lazymar_cond_cache"] > 0
    cond_only = [s for s in result.report["steps"] if s["decoder"][0]["rows"] == 2 and s["encoder"][0]["rows"] == 2]
    assert len(cond_only) == 6, "lazy steps run the conditional rows only"
    # late lazy steps (keep ratio < 1) narrow the decoder after the selection layer
    assert any(s["decoder"][-1]["queries"] < s["decoder"][-1]["keys"] for s in cond_only)


def test_lazymar_batch_invariant_and_without_guidance(model):
    policy = lazymar_policy(2, 3, "float16")
    sampler = Sampler(model, policy)
    together = sampler.generate(labels=[0, 5, 9], seed=8).tokens
    alone = torch.cat([sampler.generate(labels=[lab], seed=8, sample_offset=i).tokens for i, lab in enumerate([0, 5, 9])])
    assert rel_err(together, alone) < 1e-5
    uncond = Sampler(model, lazymar_policy(2, 3, cfg=1.0)).generate(labels=[0, 5], seed=8)
    assert torch.isfinite(uncond.tokens).all()
    assert uncond.report["engagement"]["lazymar_cond_cache"] == {"inactive_without_guidance": 10}


def test_lazymar_jump_refresh_runs_full_at_schedule_jumps(model):
    """GtR's stepped schedule on 4x4 reveals 1, 1, 1, 1, 2, 2, 8 tokens: jump_refresh 1.5 adds full passes at
    steps 4 and 6 to the fixed schedule's 0 and 1 (warm-up 1, refresh never), in both caches."""
    gtr = [{"name": "gtr_order"}, {"name": "gtr_schedule", "params": {"rates": [1.0, 2.0, 64.0], "head_schedule": False}}]

    def run(jump):
        schedule = {"warmup_steps": 1, "refresh_interval": 100, "jump_refresh": jump}
        policy = resolve_policy({"sampler": {"head_steps": 4}, "plugins": gtr + [
            {"name": "lazymar_token_cache", "params": {**schedule, "cache_dtype": "float32"}},
            {"name": "lazymar_cond_cache", "params": schedule}]})
        result = Sampler(model, policy).generate(labels=[1, 4], seed=3)
        assert [s["tokens"] for s in result.report["steps"]] == [1, 1, 1, 1, 2, 2, 8]
        return result, [s["step"] for s in result.report["steps"] if s["encoder"][0]["rows"] == 4]  # both branches

    jumped, full = run(1.5)
    assert full == [0, 1, 4, 6]
    assert jumped.report["engagement"]["lazymar_cond_cache"] == {"full_steps": 4, "cond_only_steps": 3}
    plain, full = run(None)
    assert full == [0, 1]
    assert jumped.report["flops"]["flops_per_image"] > plain.report["flops"]["flops_per_image"]
    with pytest.raises(ConfigError, match=r"jump_refresh=1.0: must be > 1"):
        resolve_policy({"plugins": [{"name": "lazymar_token_cache", "params": {"jump_refresh": 1.0}}]})
    with pytest.raises(ConfigError, match="jump_refresh=1.5 differs from lazymar_cond_cache.jump_refresh=None"):
        Sampler(model, resolve_policy({"plugins": [{"name": "lazymar_token_cache", "params": {"jump_refresh": 1.5}},
                                                   {"name": "lazymar_cond_cache"}]}))


def test_lazymar_config_errors(model):
    with pytest.raises(ConfigError, match="refresh_interval=9 differs from lazymar_cond_cache.refresh_interval=4"):
        Sampler(model, resolve_policy({"plugins": [
            {"name": "lazymar_token_cache", "params": {"refresh_interval": 9}},
            {"name": "lazymar_cond_cache", "params": {"refresh_interval": 4}}]}))
    deep = Sampler(model, resolve_policy({"sampler": {"num_iter": 4, "head_steps": 2},
                                          "plugins": [{"name": "lazymar_token_cache", "params": {"selection_layer": 7}}]}))
    report = deep.generate(labels=[1], seed=0).report
    assert report["engagement"]["lazymar_token_cache"]["selection_layer_effective"] == 3  # 5 blocks: capped at 3
    with pytest.raises(ConfigError, match=r"params: warmup_steps=0"):
        resolve_policy({"plugins": [{"name": "lazymar_token_cache", "params": {"warmup_steps": 0}}]})
    with pytest.raises(Exception, match="conflict"):
        Sampler(model, resolve_policy({"plugins": [{"name": "lazymar_token_cache"}, {"name": "recap"}]}))


def test_recap_step_kinds():
    cfg = ReCAPConfig()
    kinds = [step_kind(s, 8, cfg)[0] for s in range(8)]
    assert kinds == ["warmup"] * 4 + ["full", "local", "full", "local"]
    assert [step_kind(s, 96, cfg)[0] for s in range(96)].count("local") == 24  # 72 + 24 as released


def test_recap_without_local_steps_equals_baseline(model):
    expected = baseline(model).generate(labels=[2, 3], seed=1).tokens
    policy = resolve_policy({"sampler": {"num_iter": 10, "head_steps": 4}, "plugins": [{"name": "recap", "params": {"local_per_group": 0, "final_step_cfg": "schedule"}}]})
    assert rel_err(Sampler(model, policy).generate(labels=[2, 3], seed=1).tokens, expected) < 1e-6


def test_recap_local_steps_cache_both_branches(model):
    policy = resolve_policy({"sampler": {"num_iter": 10, "head_steps": 4}, "plugins": [{"name": "recap", "params": {"local_head_steps": 3}}]})
    watcher = CacheWatcher()
    sampler = Sampler(model, policy, extra_plugins=[watcher])
    result = sampler.generate(labels=[2, 3], seed=1)
    steps = result.report["steps"]
    local = [s for s in steps if s["owners"]["forward"] == "recap" and s["decoder"][0]["queries"] < s["decoder"][0]["keys"]]
    assert len(local) == 2 and all(s["rows"] == 4 and s["decoder"][0]["rows"] == 4 for s in local)
    assert all(set(s["head_rows_by_steps"]) == {"3"} for s in local)
    expected = baseline(model).generate(labels=[2, 3], seed=1).tokens
    assert rel_err(result.tokens, expected) > 1e-4
    together = result.tokens
    alone = torch.cat([sampler.generate(labels=[lab], seed=1, sample_offset=i).tokens for i, lab in enumerate([2, 3])])
    assert rel_err(together, alone) < 1e-5
