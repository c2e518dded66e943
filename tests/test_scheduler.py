"""The hooked loop with only built-in plugins is the official MAR sampler."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from marcache.plugins.cfg_schedules import linear_cfg_scale
from marcache.plugins.cosine_schedule import cosine_tokens_per_step
from marcache.policy import load_policy
from marcache.scheduler import Sampler, generate_tokens, sample_generators

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from official_loop import official_sample_tokens  # noqa: E402  (the benchmarks' external baseline)

SCHEDULES = json.loads((Path(__file__).parent / "fixtures" / "mar_parity" / "schedules.json").read_text())


@pytest.mark.parametrize("cfg,schedule,temperature,head", [(3.0, "linear", 1.0, "100"), (1.0, "linear", 0.95, "25"), (2.5, "constant", 1.0, "25")])
def test_identity_with_official_loop(cfg, schedule, temperature, head):
    from conftest import make_tiny

    model = make_tiny(num_sampling_steps=head)
    labels = [3, 7]
    with torch.no_grad():
        expected = official_sample_tokens(model, labels, 6, cfg, schedule, temperature, head_steps=head,
                                          generators=sample_generators(11, [0, 1]))
        got = generate_tokens(model, labels=labels, num_iter=6, cfg=cfg, cfg_schedule=schedule,
                              temperature=temperature, seed=11).tokens
    assert got.shape == expected.shape
    # 1e-5 of the largest value, the project's float32 parity bound: the random tiny model's unclipped chain
    # grows to ~6e4 and amplifies GEMM rounding (shape-dependent kernels; 1.05e-6 on an AVX512 Xeon)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


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
    # the setting travels in the head plan; the model holds no per-run state
    assert not hasattr(tiny_model.diffloss, "clip_denoised")
    assert torch.equal(_baseline(tiny_model, "sampler.num_iter=3").generate(labels=[1], seed=0).tokens, free)


def test_generate_tokens_applies_sampler_arguments_to_a_resolved_policy(tiny_model):
    """The sampler arguments are honoured whether the policy is a name or a resolved policy."""
    from marcache.policy import load_policy
    from marcache.scheduler import generate_tokens

    by_name = generate_tokens(tiny_model, labels=[1], num_iter=3, head_steps=2, cfg=2.0, seed=0)
    resolved = generate_tokens(tiny_model, labels=[1], num_iter=3, head_steps=2, cfg=2.0, seed=0, policy=load_policy("baseline"))
    assert by_name.report["num_steps"] == resolved.report["num_steps"] == 3
    assert resolved.report["sampler"]["cfg"] == 2.0 and resolved.report["sampler"]["head_steps"] == 2
    assert torch.equal(by_name.tokens, resolved.tokens)
    kept = generate_tokens(tiny_model, labels=[1], seed=0, policy=load_policy("baseline", ["sampler.num_iter=2", "sampler.head_steps=2"]))
    assert kept.report["num_steps"] == 2  # no argument given: the policy's settings stand


def test_num_masked_after_is_the_true_count(tiny_model):
    from marcache.testing import StepRecorder

    rec = StepRecorder()
    Sampler(tiny_model, load_policy("baseline", ["sampler.num_iter=4", "sampler.head_steps=2"]), extra_plugins=[rec]).generate(labels=[1], seed=0)
    left = [int(s.mask_next.sum()) for s, _ in rec.steps]
    assert [s.num_masked_after for s, _ in rec.steps] == left and left[-1] == 0
