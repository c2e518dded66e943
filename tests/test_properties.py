"""Hypothesis properties of the loop for random grids, step counts, batch sizes and guidance."""

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny, rel_err
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.policy import load_policy
from marcache.scheduler import Sampler
from marcache.testing import StepRecorder


@functools.lru_cache(maxsize=None)
def model_for(grid):
    return make_tiny(grid)


@st.composite
def runs(draw):
    grid = draw(st.integers(2, 5))
    seq_len = grid * grid
    return dict(
        grid=grid,
        num_iter=draw(st.integers(1, seq_len)),
        batch=draw(st.integers(1, 3)),
        cfg=draw(st.sampled_from([1.0, 2.0, 4.5])),
        schedule=draw(st.sampled_from(["linear", "constant"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(params):
    model = model_for(params["grid"])
    policy = load_policy("baseline", [f"sampler.num_iter={params['num_iter']}", f"sampler.cfg={params['cfg']}",
                                      f"sampler.cfg_schedule={params['schedule']}", "sampler.head_steps=2"])
    recorder = StepRecorder()
    labels = torch.randint(0, 10, (params["batch"],), generator=torch.Generator().manual_seed(params["seed"]))
    result = Sampler(model, policy, extra_plugins=[recorder]).generate(labels=labels, seed=params["seed"])
    return model, recorder, result


@settings(max_examples=20)
@given(runs())
def test_scheduling_invariants(params):
    model, rec, result = run(params)
    b, seq_len = params["batch"], model.seq_len
    orders = rec.gen.orders
    # the order is a permutation per sample
    assert torch.equal(orders.sort(dim=1).values, torch.arange(seq_len).expand(b, -1))
    predicted = torch.zeros(b, seq_len, dtype=torch.long)
    counts, masked, prev = [], seq_len, torch.zeros(b, seq_len, dtype=torch.bool)
    for index, (step, record) in enumerate(rec.steps):
        k = step.mask_to_pred.sum(dim=1)
        # tokens per step >= 1, equal across samples; only masked positions are predicted
        assert int(k.min()) >= 1 and torch.all(k == k[0])
        assert not (step.mask_to_pred & ~step.mask).any()
        # revealed from the tail of each order
        n = int(k[0])
        for i in range(b):
            expected = torch.zeros(seq_len, dtype=torch.bool)
            expected[orders[i, masked - n : masked]] = True
            assert torch.equal(step.mask_to_pred[i], expected)
        masked -= n
        # at least one token stays masked until the last step
        if index < len(rec.steps) - 1:
            assert int(step.mask_next.sum(dim=1).min()) >= 1
        # the previous step's predictions are handed over
        assert torch.equal(step.prev_mask_to_pred, prev)
        prev = step.mask_to_pred
        # the guidance scale follows the schedule
        if params["cfg"] == 1.0:
            assert step.cfg_scale == 1.0
        elif params["schedule"] == "constant":
            assert step.cfg_scale == params["cfg"]
        else:
            assert step.cfg_scale == linear_cfg_scale(params["cfg"], seq_len, max(masked, 1))
        # the head ran once per predicted token (x2 rows under guidance)
        rows_per_chain = 2 if params["cfg"] != 1.0 else 1
        assert record.head_rows_by_steps == {2: rows_per_chain * b * n}
        predicted += step.mask_to_pred.long()
        counts.append(n)
    # every token predicted exactly once; counts sum to seq_len; the plan had num_iter steps
    assert torch.equal(predicted, torch.ones(b, seq_len, dtype=torch.long))
    assert sum(counts) == seq_len and len(counts) == params["num_iter"]
    assert torch.isfinite(result.tokens).all() and result.tokens.shape == (b, seq_len, model.token_embed_dim)


@settings(max_examples=10)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 1000))
def test_batch_equals_one_by_one(grid, batch, seed):
    model = model_for(grid)
    policy = load_policy("baseline", [f"sampler.num_iter={grid}", "sampler.head_steps=2"])
    sampler = Sampler(model, policy)
    labels = list(range(batch))
    together = sampler.generate(labels=labels, seed=seed).tokens
    alone = torch.cat([sampler.generate(labels=[lab], seed=seed, sample_offset=i).tokens for i, lab in enumerate(labels)])
    assert rel_err(together, alone) < 1e-6
