"""Halton order: equals the Halton-MaskGIT release's mask, revealed from the tail, optional roll."""

import numpy as np
import pytest
import torch

from conftest import make_tiny, rel_err
from marcache.policy import resolve_policy
from marcache.plugins.halton_order import halton_sequence, radical_inverse
from marcache.scheduler import Sampler
from marcache.testing import StepRecorder


def published_mask(size: int, nb_point: int = 10_000) -> list[tuple[int, int]]:
    """The release's construction, rebuilt from its description: the incremental Halton generator
    (bases 2 and 3, first value 1/b), float32 points scaled by the grid size and floored, duplicates
    dropped keeping the first occurrence. Returns (row, column) cells in sampling order."""

    def generator(base, count):
        n, d, out = 0, 1, []
        for _ in range(count):
            x = d - n
            if x == 1:
                n, d = 1, d * base
            else:
                y = d // base
                while x <= y:
                    y //= base
                n = (base + 1) * y - x
            out.append(n / d)
        return out

    points = torch.stack([torch.tensor(generator(2, nb_point)), torch.tensor(generator(3, nb_point))], dim=1)
    assert points.dtype == torch.float32  # the release's tensor of Python floats
    cells = torch.floor(points * size).numpy()
    first = np.unique(cells, return_index=True, axis=0)[1]
    return [tuple(int(v) for v in cells[i]) for i in sorted(first)]


@pytest.mark.parametrize("size", [16, 7])
def test_equals_the_release_mask(size):
    reference = published_mask(size)
    assert len(reference) == size * size
    assert list(halton_sequence(size, size)) == [r * size + c for r, c in reference]


def test_radical_inverse_and_first_points():
    assert [radical_inverse(i, 2) for i in (1, 2, 3, 4)] == [(1, 2), (1, 4), (3, 4), (1, 8)]
    assert [radical_inverse(i, 3) for i in (1, 2, 3)] == [(1, 3), (2, 3), (1, 9)]
    # 16x16: point 1 = (0.5, 1/3) -> cell (8, 5)
    assert halton_sequence(16, 16)[0] == 8 * 16 + 5


@pytest.mark.parametrize("h,w", [(1, 1), (2, 5), (5, 3), (9, 9), (3, 32)])
def test_any_grid_is_a_permutation(h, w):
    seq = halton_sequence(h, w)
    assert sorted(seq) == list(range(h * w))


def test_mar_reveals_the_first_halton_point_first_and_roll_is_per_sample():
    model = make_tiny(4)
    recorder = StepRecorder()
    policy = resolve_policy({"sampler": {"num_iter": 16, "head_steps": 5}, "plugins": [{"name": "halton_order"}]})
    Sampler(model, policy, extra_plugins=[recorder]).generate(labels=[1, 2], seed=0)
    seq = halton_sequence(4, 4)
    for i, (step, _) in enumerate(recorder.steps):  # one token per step: the i-th Halton point
        assert step.mask_to_pred.nonzero()[:, 1].tolist() == [seq[i], seq[i]]

    rolled = resolve_policy({"sampler": {"num_iter": 4, "head_steps": 5}, "plugins": [{"name": "halton_order", "params": {"roll": True}}]})
    recorder = StepRecorder()
    sampler = Sampler(model, rolled, extra_plugins=[recorder])
    result = sampler.generate(labels=[1, 2, 3], seed=5)
    orders = recorder.gen.orders
    for row in orders:  # each row is a rotation of the reversed sequence
        first = row.flip(0).tolist()
        shift = first.index(seq[0])
        assert first == list(seq[-shift:] + seq[:-shift]) if shift else first == list(seq)
    assert len({tuple(r.tolist()) for r in orders}) > 1  # rolls differ between samples
    alone = torch.cat([sampler.generate(labels=[lab], seed=5, sample_offset=i).tokens for i, lab in enumerate([1, 2, 3])])
    assert rel_err(result.tokens, alone) < 1e-5
