"""Drift-triggered refresh of LazyMAR's caches: triggers, never-computed positions, FLOPs of measuring."""

import pytest
import torch

from conftest import make_tiny
from marcache.errors import ConfigError
from marcache.flops import policy_flops
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler
from marcache.testing import StepRecorder as Watcher

LAZY = {"warmup_steps": 2, "refresh_interval": 100, "cache_dtype": "float32"}


def policy(threshold, cond=True, cfg=3.0, num_iter=8):
    plugins = [{"name": "lazymar_token_cache", "params": LAZY}]
    if cond:
        plugins.append({"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 100}})
    plugins.append({"name": "drift_refresh", "params": {"threshold": threshold}})
    return resolve_policy({"sampler": {"num_iter": num_iter, "cfg": cfg, "head_steps": 6}, "plugins": plugins})


@pytest.fixture(scope="module")
def model():
    return make_tiny(4, decoder_depth=4)


@pytest.mark.parametrize("cond,cfg", [(True, 3.0), (False, 3.0), (False, 1.0)])
def test_threshold_zero_refreshes_and_never_serves_uncomputed_positions(model, cond, cfg):
    watcher = Watcher()
    sampler = Sampler(model, policy(0.0, cond=cond, cfg=cfg), extra_plugins=[watcher])
    result = sampler.generate(labels=[3, 8], seed=2)
    section = result.report["engagement"]["drift_refresh"]
    assert section["refreshes"] >= 1 and section["measurements"] >= 1
    assert watcher.stale_reads == 0 and torch.isfinite(result.tokens).all()
    owners = [r.owners["forward"] for _, r in watcher.steps]
    assert owners.count("drift_refresh") == section["refreshes"]
    # a refresh step is a full pass: every decoder position recomputed, both branches under CFG
    for step, record in watcher.steps:
        if record.owners["forward"] == "drift_refresh":
            assert record.decoder_runs[-1].queries == model.buffer_size + model.seq_len
            assert record.encoder_runs[0].rows == (4 if cfg != 1.0 else 2)


def test_never_serves_uncomputed_positions_at_any_threshold(model):
    for threshold in (0.0, 0.02, 0.2, 2.0):
        watcher = Watcher()
        Sampler(model, policy(threshold), extra_plugins=[watcher]).generate(labels=[1, 4, 7], seed=threshold * 10)
        assert watcher.stale_reads == 0


def test_refreshes_fall_with_the_threshold_and_cost_is_counted(model):
    counts, flops = [], []
    for threshold in (0.0, 0.05, 2.0):
        result = Sampler(model, policy(threshold)).generate(labels=[2, 5], seed=0)
        counts.append(result.report["engagement"]["drift_refresh"]["refreshes"])
        flops.append(result.report["flops"]["tflops_per_image"])
    assert counts[0] >= counts[1] >= counts[2] == 0 and counts[0] > 0
    assert flops[0] > flops[2]
    # the measuring cost is in the decoder's operators, and absent without the plugin
    with_drift = Sampler(model, policy(2.0)).generate(labels=[2, 5], seed=0).report["flops"]
    assert with_drift["components"]["decoder"]["by_operator"].get("drift_cosine", 0) > 0
    plain = resolve_policy({"sampler": {"num_iter": 8, "cfg": 3.0, "head_steps": 6},
                            "plugins": [{"name": "lazymar_token_cache", "params": LAZY},
                                        {"name": "lazymar_cond_cache", "params": {"warmup_steps": 2, "refresh_interval": 100}}]})
    plain_flops = policy_flops(model, plain, num_images=2, execute=True)
    assert "drift_cosine" not in plain_flops["components"]["decoder"]["by_operator"]
    assert with_drift["tflops_per_image"] > plain_flops["tflops_per_image"]


def test_needs_lazymar_token_cache(model):
    bad = resolve_policy({"plugins": [{"name": "drift_refresh"}]})
    with pytest.raises(ConfigError, match="lazymar_token_cache"):
        Sampler(model, bad)
    with pytest.raises(ConfigError, match="threshold"):
        resolve_policy({"plugins": [{"name": "drift_refresh", "params": {"threshold": -1}}]})
