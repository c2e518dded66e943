"""Every policy shipped in policies/ is loaded, run on a tiny model and checked (timm-style battery)."""

from pathlib import Path

import pytest
import torch

from marcache.policy import list_shipped_policies, load_policy
from marcache.scheduler import Sampler
from conftest import make_tiny
from test_properties import StepRecorder

POLICY_FILES = sorted((Path(__file__).parents[1] / "policies").glob("*.yaml"))


def test_every_file_is_shipped():
    assert [p.stem for p in POLICY_FILES] == list_shipped_policies()
    assert "baseline" in list_shipped_policies()


@pytest.fixture(scope="module")
def battery_model():
    # deep enough for every shipped policy's defaults (LazyMAR selects at decoder layer 3 and skips
    # head blocks 1-4)
    return make_tiny(4, decoder_depth=4, diffloss_d=6)


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.stem)
def test_policy_runs_on_tiny_model(path, battery_model):
    policy = load_policy(str(path), ["sampler.num_iter=12", "sampler.head_steps=30"])
    recorder = StepRecorder()
    result = Sampler(battery_model, policy, extra_plugins=[recorder]).generate(labels=[1, 5], seed=0)
    predicted = sum(step.mask_to_pred.long() for step, _ in recorder.steps)
    assert torch.equal(predicted, torch.ones_like(predicted)), "every token predicted exactly once"
    assert torch.isfinite(result.tokens).all()
    assert not result.report["never_engaged"], f"plugins that never engaged: {result.report['never_engaged']}"
