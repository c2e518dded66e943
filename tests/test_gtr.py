"""GtR order/schedule and FTS head budgets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny, rel_err
from marcache.errors import ConfigError
from marcache.policy import load_policy, resolve_policy
from marcache.scheduler import Sampler
from marcache.plugins.fts import fts_scores
from marcache.plugins.gtr import GtRScheduleConfig, gtr_plan, gtr_stages, head_steps_for
from marcache.testing import HeadChainCounter, StepRecorder


def test_stage_sizes_16x16_k3():
    stages = gtr_stages(16, 16, 3)
    assert [len(s) for s in stages] == [64, 64, 128]
    r, c = torch.div(torch.arange(256), 16, rounding_mode="floor"), torch.arange(256) % 16
    assert torch.all((r + c)[stages[2]] % 2 == 1)  # reconstruction: odd checkerboard
    assert torch.all((r + c)[stages[0]] % 4 == 0) and torch.all((r + c)[stages[1]] % 4 == 2)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.sampled_from(["low", "high"]))
def test_stages_partition_any_grid(h, w, k, half):
    stages = gtr_stages(h, w, k, half)
    assert len(stages) == k
    allpos = torch.cat(stages).sort().values
    assert torch.equal(allpos, torch.arange(h * w))


def test_stages_are_spatially_uniform():
    # every 4x4 window of a 16x16 grid holds the same number of tokens of each stage
    stages = gtr_stages(16, 16, 3)
    for stage, per_window in zip(stages, (4, 4, 8)):
        grid = torch.zeros(256)
        grid[stage] = 1
        windows = grid.reshape(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16).sum(1)
        assert torch.all(windows == per_window)


def test_schedule_literal_reading_and_head_ramp():
    counts, stage_of_step = gtr_plan(16, 16, GtRScheduleConfig())
    assert len(counts) == 32 and sum(counts) == 256  # 24 / 6 / 2 steps
    assert stage_of_step.count(0) == 24 and stage_of_step.count(1) == 6 and stage_of_step.count(2) == 2
    heads = head_steps_for(stage_of_step, GtRScheduleConfig())
    assert heads[0] == 50 and heads[29] == 20 and heads[30:] == [20, 20]
    assert all(a >= b for a, b in zip(heads, heads[1:]))
    counts, _ = gtr_plan(16, 16, GtRScheduleConfig(steps_per_stage=[12, 3, 1]))
    assert counts[-1] == 128 and len(counts) == 16
    with pytest.raises(ConfigError, match="cannot take 9 steps"):
        gtr_plan(4, 4, GtRScheduleConfig(steps_per_stage=[9, 1, 1]))


def test_gtr_order_and_budgets_honoured():
    model = make_tiny(4)
    recorder = StepRecorder()
    policy = load_policy("gtr_fts", ["gtr_schedule.head_max=12", "gtr_schedule.head_min=4", "gtr_schedule.head_rec=3",
                                     "fts.detail_steps=9", "fts.beta=0.25"])
    with HeadChainCounter(model) as counter:
        result = Sampler(model, policy, extra_plugins=[recorder]).generate(labels=[1, 2], seed=3)
    stages = gtr_stages(4, 4, 3)
    stage_of = torch.zeros(16, dtype=torch.long)
    for k, s in enumerate(stages):
        stage_of[s] = k
    seen_stage = 0
    expected_rows_steps = 0
    for step, record in recorder.steps:
        pos = step.mask_to_pred.nonzero()[:, 1]
        stage = int(stage_of[pos].max())
        assert torch.all(stage_of[pos] == stage) and stage >= seen_stage  # stages in order, never mixed
        seen_stage = stage
        expected_rows_steps += sum(steps * rows for steps, rows in record.head_rows_by_steps.items())
        if stage == 2:  # reconstruction: 25% of each image's 8 tokens get the detail budget
            assert record.head_rows_by_steps == {3: 2 * 2 * 6, 9: 2 * 2 * 2}
    assert counter.rows_steps == expected_rows_steps
    assert result.report["engagement"]["fts"]["detail_tokens"] == 2 * 2


def test_fts_picks_highest_frequency_tokens():
    d = 32
    n = torch.arange(d, dtype=torch.float32)
    smooth = torch.cos(2 * torch.pi * 1 * n / d)  # energy at frequency 1
    sharp = torch.cos(2 * torch.pi * 12 * n / d)  # same amplitude at frequency 12: larger weight
    dc = torch.full((d,), 5.0)  # DC only: excluded -> score 0
    z = torch.stack([smooth, dc, sharp, 0.5 * sharp])[None]
    scores = fts_scores(z)[0]
    assert scores.argmax().item() == 2 and scores[1].abs().item() < 1e-4
    half = d // 2
    assert torch.allclose(scores[0], torch.tensor(d / 2 * (1 + 1 / half)), rtol=1e-4)
    assert torch.allclose(scores[2], torch.tensor(d / 2 * (1 + 12 / half)), rtol=1e-4)


def test_fts_requires_gtr_schedule_for_reconstruction(tiny_model):
    policy = resolve_policy({"plugins": [{"name": "fts"}]})
    with pytest.raises(ConfigError, match="needs the gtr_schedule plugin"):
        Sampler(tiny_model, policy)
    ok = resolve_policy({"sampler": {"num_iter": 2, "head_steps": 3}, "plugins": [{"name": "fts", "params": {"apply_to": "all", "detail_steps": 5}}]})
    report = Sampler(tiny_model, ok).generate(labels=[0], seed=0).report
    assert all(set(s["head_rows_by_steps"]) == {"3", "5"} for s in report["steps"])


@settings(max_examples=10)
@given(st.integers(2, 5), st.integers(1, 2))
def test_gtr_batch_invariant(grid, batch):
    model = make_tiny(grid)
    policy = load_policy("gtr", ["gtr_schedule.head_max=4", "gtr_schedule.head_min=2", "gtr_schedule.head_rec=2"])
    sampler = Sampler(model, policy)
    labels = list(range(batch))
    together = sampler.generate(labels=labels, seed=1).tokens
    alone = torch.cat([sampler.generate(labels=[lab], seed=1, sample_offset=i).tokens for i, lab in enumerate(labels)])
    assert rel_err(together, alone) < 1e-6
