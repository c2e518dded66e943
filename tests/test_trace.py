"""The trace and the run report tell what executed: recomputed vs cached positions from the plan."""

import pytest
import torch
from PIL import Image

from marcache.caching import feature_cache_of
from marcache.hookspecs import hookimpl
from marcache.plugins.lazymar import is_full_step
from marcache.plugins.trace import CACHED, PREDICTED, RECOMPUTED, TraceRecorder, plugin_colour
from marcache.policy import resolve_policy
from marcache.scheduler import Sampler
from marcache.testing import StepRecorder, make_tiny

WARMUP, REFRESH, STEPS = 2, 4, 10


@pytest.fixture(scope="module")
def model():
    return make_tiny(4, decoder_depth=4)


def lazymar(cfg=3.0):
    return resolve_policy({"sampler": {"num_iter": STEPS, "head_steps": 4, "cfg": cfg}, "plugins": [
        {"name": "lazymar_token_cache", "params": {"warmup_steps": WARMUP, "refresh_interval": REFRESH, "cache_dtype": "float32"}},
        {"name": "lazymar_cond_cache", "params": {"warmup_steps": WARMUP, "refresh_interval": REFRESH}}]})


def test_lazymar_trace_shows_cached_cells_by_colour(model, tmp_path):
    tracer = TraceRecorder()
    Sampler(model, lazymar(), extra_plugins=[tracer]).generate(labels=[3], seed=1)
    grid = (model.seq_h, model.seq_w)
    path = tracer.render(0, grid, tmp_path / "trace.png")
    img = Image.open(path).convert("RGB")
    cached_cells = 0
    for step, (kinds, _, owners) in enumerate(tracer.samples[0]):
        lazy = not is_full_step(step, WARMUP, REFRESH)
        for pos in range(model.seq_len):
            x0, y0, _, _ = tracer.cell_box(0, grid, step, pos)
            pixel = img.getpixel((x0, y0))  # the corner: never covered by the "known" dot
            kind = int(kinds[pos])
            if kind == CACHED:
                cached_cells += 1
                assert lazy and owners["forward"].startswith("lazymar_")
                assert pixel == plugin_colour(owners["forward"], CACHED), (step, pos)
            elif kind == RECOMPUTED:
                assert pixel == plugin_colour(owners["forward"], RECOMPUTED)
            elif kind == PREDICTED:
                assert pixel == plugin_colour(owners["head"], PREDICTED)
    lazy_steps = sum(not is_full_step(s, WARMUP, REFRESH) for s in range(STEPS))
    assert lazy_steps == 6 and cached_cells > 0


def test_baseline_trace_has_no_cached_colour(model, tmp_path):
    tracer = TraceRecorder()
    Sampler(model, resolve_policy({"sampler": {"num_iter": 4, "head_steps": 2}}), extra_plugins=[tracer]).generate(labels=[3], seed=1)
    img = Image.open(tracer.render(0, (model.seq_h, model.seq_w), tmp_path / "t.png")).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert plugin_colour("full_recompute", RECOMPUTED) in colours and plugin_colour("ddpm_head", PREDICTED) in colours
    assert plugin_colour("full_recompute", CACHED) not in colours  # nor in the legend: it never happened


class ExecutedPositionsProbe(StepRecorder):
    """Checks at every step that the record's masks equal the positions the partial pass ran."""

    name = "test_trace_probe"

    @hookimpl
    def marcache_step_end(self, step, record):
        super().marcache_step_end(step, record)
        cache = feature_cache_of(step.store)
        if record.cached is not None:
            b, buf = step.gen.batch_size, step.gen.model.buffer_size
            ran = torch.zeros(b, buf + step.gen.seq_len, dtype=torch.bool)
            ran.scatter_(1, cache.last_decoder_positions[:b], True)
            assert torch.equal(ran[:, buf:], record.recomputed) and torch.equal(~ran[:, buf:], record.cached)
            self.engagement["checked"] += 1


def test_record_masks_and_report_counts_come_from_the_executed_plan(model):
    recorder = ExecutedPositionsProbe()
    result = Sampler(model, lazymar(), extra_plugins=[recorder]).generate(labels=[3, 5], seed=1)
    seq_len = model.seq_len
    hits = 0
    for (step, record), entry in zip(recorder.steps, result.report["steps"]):
        pos = entry["positions"]
        if is_full_step(step.step, WARMUP, REFRESH):
            assert record.cached is None or not record.cached.any()
            assert pos["decoder_from_cache"] == 0 and pos["uncond_from_cond_cache"] == 0
            continue
        assert torch.equal(record.recomputed, ~record.cached)
        assert (record.recomputed | ~step.mask_to_pred).all()  # predicted tokens are always recomputed
        assert pos["decoder_recomputed"] == int(record.recomputed.sum())
        assert pos["decoder_from_cache"] == int(record.cached.sum()) == 2 * seq_len - pos["decoder_recomputed"]
        assert pos["uncond_from_cond_cache"] == 2 * seq_len  # the whole unconditional branch
        enc = entry["encoder"][0]
        assert pos["encoder_recomputed"] == 2 * enc["queries"] and pos["encoder_from_cache"] == 2 * (enc["keys"] - enc["queries"])
        hits += pos["decoder_from_cache"]
    summary = result.report["cache_hits"]["decoder"]
    assert summary["from_cache"] == hits > 0
    assert summary["hit_rate"] == pytest.approx(hits / (hits + summary["recomputed"]))
    assert recorder.engagement["checked"] == STEPS  # the token cache runs a partial pass at every step
