"""FLOP accounting: hand counts, the FlopCounterMode cross-check, cached-K/V scaling, ratios, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import marcache.cli as cli
from marcache.errors import ConfigError
from marcache.backends.shape_only import ShapeOnlyBackend
from marcache.flops import (CostModel, ExecutedShapes, FlopAccumulator, compare_with_baseline, cost_model_for, flop_counter_mode,
                            policy_flops, record_flops)
from marcache.models import model_config, create_model, meta_model
from marcache.plans import TransformerRun
from marcache.policy import load_policy
from marcache.scheduler import Sampler

D, HIDDEN = 64, 256  # mar_tiny: width 64, mlp ratio 4, 2 + 2 blocks, buffer 16, L = 16, token dim 16
W, HEAD_DEPTH, C, TFREQ = 64, 2, 16, 256  # its head: width 64, 2 res blocks, 16 channels, 256 time freqs


def block_flops(q: int, k: int, d: int = D, hidden: int = HIDDEN) -> int:
    """Hand count, 2 x MAC: qkv + proj + fc1 + fc2 on q tokens, QK^T + AV over k keys."""
    return 2 * (q * (4 * d * d + 2 * d * hidden) + q * k * 2 * d)


def head_pass_flops() -> int:
    """One official SimpleMLPAdaLN pass on one row."""
    time_mlp = TFREQ * W + W * W
    cond = D * W
    trunk = C * W + HEAD_DEPTH * (2 * W * W + 3 * W * W) + 2 * W * W + W * 2 * C
    return 2 * (time_mlp + cond + trunk)


@pytest.fixture(autouse=True)
def _only_our_commands(monkeypatch):
    # the CLI parser imports every registered command module; keep this test independent of others'
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["marcache.flops.command", "marcache.bench.command"])


def main(argv):
    return cli.main(argv)


@pytest.fixture(scope="module")
def tiny_costs() -> CostModel:
    return cost_model_for(meta_model("mar_tiny"))


def test_block_cost_matches_hand_count(tiny_costs):
    for q, k in [(16, 16), (17, 32), (32, 32), (1, 32), (5, 20)]:
        part = "encoder" if q == k else "decoder"
        assert sum(tiny_costs.block(part, q, k).values()) == block_flops(q, k)


def test_head_pass_matches_hand_count(tiny_costs):
    assert sum(tiny_costs.head_step().values()) == head_pass_flops()
    assert tiny_costs.vae_decode() == {}  # pixel-space model: no VAE


def test_invalid_run_shape_rejected(tiny_costs):
    with pytest.raises(ValueError):
        tiny_costs.block("encoder", 10, 5)


def _Record(enc, dec, head, step=0) -> ExecutedShapes:
    return ExecutedShapes(step, tuple(enc), tuple(dec), head)


def test_recomputing_k_of_n_tokens_scales_as_expected(tiny_costs):
    """A decoder run that recomputes k of n positions (the rest from cached K/V) costs the linear
    part in proportion k/n and the attention in proportion k*n/n^2."""
    n, rows, layers = 32, 4, 2
    full, _ = record_flops(tiny_costs, _Record([], [TransformerRun(rows, n, n, layers)], {}))
    for k in (1, 8, 16):
        part, _ = record_flops(tiny_costs, _Record([], [TransformerRun(rows, k, n, layers)], {}))
        linear = 2 * (4 * D * D + 2 * D * HIDDEN)
        attention = 2 * 2 * D
        stem = 2 * 16 * D * D  # decoder_embed on the 16 encoder outputs implied by keys - L
        assert part.decoder == rows * (layers * (k * linear + k * n * attention) + stem)
        assert full.decoder - part.decoder == rows * layers * ((n - k) * linear + (n - k) * n * attention)


def test_one_official_step_matches_hand_count(tiny_costs):
    """Step 0 of the baseline at batch 1 with CFG: 2 rows, encoder on the 16 buffer slots, decoder on
    16 + 16, every predicted token's head chain on 2 rows."""
    rows, head_steps, k = 2, 7, 3
    rec = _Record([TransformerRun(rows, 16, 16, 2)], [TransformerRun(rows, 32, 32, 2)], {head_steps: rows * k})
    step, _ = record_flops(tiny_costs, rec)
    z_proj = 2 * 16 * C * D  # all L tokens
    decoder_embed = 2 * 16 * D * D  # the encoder's 16 outputs
    assert step.encoder == rows * (2 * block_flops(16, 16) + z_proj)
    assert step.decoder == rows * (2 * block_flops(32, 32) + decoder_embed)
    assert step.head == rows * k * head_steps * head_pass_flops()


def test_cross_check_with_flop_counter_mode():
    """The accounting of a real generation equals torch's FlopCounterMode on the same run (the head
    compared as executed: cond_embed and time MLP hoisted out of the chain)."""
    torch.manual_seed(0)
    model = create_model("mar_tiny")
    policy = load_policy("baseline", ["sampler.head_steps=4", "sampler.num_iter=4"])
    sampler = Sampler(model, policy)
    sampler.generate(labels=[1, 2], num_images=2, seed=0, batch_size=2)  # prices the shapes (cached) outside the counter
    with flop_counter_mode() as counter:
        result = sampler.generate(labels=[1, 2], num_images=2, seed=0, batch_size=2)
    counted = counter.get_total_flops()
    section = result.report["engagement"]["flops"]
    executed = section["components"]["encoder"]["flops"] + section["components"]["decoder"]["flops"] \
        + section["head_executed_tflops_per_image"] * 1e12 * section["images"]
    assert counted > 0
    assert executed == pytest.approx(counted, rel=1e-9)
    # the official head count exceeds the executed one by exactly the hoisted embeddings
    assert section["components"]["head"]["flops"] > section["head_executed_tflops_per_image"] * 1e12 * 2


def test_every_report_carries_flops_and_shape_only_agrees():
    model = create_model("mar_tiny")
    policy = load_policy("baseline", ["sampler.head_steps=3"])
    report = Sampler(model, policy).generate(labels=[0, 1, 2], num_images=3, seed=1, batch_size=2).report
    section = report["engagement"]["flops"]
    assert section["images"] == 3 and set(section["components"]) == {"encoder", "decoder", "head"}
    shape_only = policy_flops(meta_model("mar_tiny"), policy, num_images=3, batch_size=2)
    assert shape_only["tflops_per_image"] == pytest.approx(section["tflops_per_image"], rel=1e-12)
    # a second generate call reports only its own work
    again = Sampler(model, policy)
    again.generate(num_images=1, seed=0)
    second = again.generate(num_images=1, seed=0).report["engagement"]["flops"]
    assert second["images"] == 1


def test_baseline_ratio_is_one_and_fewer_head_steps_save_only_head():
    model = meta_model("mar_tiny")
    base = load_policy("baseline")
    same = compare_with_baseline(model, base, base)
    assert same["flops_ratio"] == 1.0
    half = compare_with_baseline(model, load_policy("baseline", ["sampler.head_steps=50"]), base)
    ours, ref = half["policy_flops"]["components"], half["baseline_flops"]["components"]
    assert ours["encoder"]["flops"] == ref["encoder"]["flops"] and ours["decoder"]["flops"] == ref["decoder"]["flops"]
    assert ours["head"]["flops"] * 2 == ref["head"]["flops"]
    assert half["flops_ratio"] > 1.0


def test_no_cfg_halves_everything():
    model = meta_model("mar_tiny")
    guided = policy_flops(model, load_policy("baseline", ["sampler.cfg=3.0"]))
    plain = policy_flops(model, load_policy("baseline", ["sampler.cfg=1.0"]))
    assert guided["total_flops"] == 2 * plain["total_flops"]


def test_mar_base_baseline_near_published():
    """64 steps, CFG, 100 head steps: within 8 % of LazyMAR's 15.49 T and of the analytic 14.63 T."""
    s = policy_flops(meta_model("mar_base"), load_policy("baseline", ["sampler.num_iter=64", "sampler.cfg=2.9"]))
    assert s["num_steps"] == 64
    assert abs(s["tflops_per_image"] / 15.49 - 1) < 0.08
    assert abs(s["tflops_per_image"] / 14.63 - 1) < 0.01
    assert s["vae_decode_tflops_per_image"] == pytest.approx(0.25, rel=0.05)


def test_shape_only_backend_returns_plan_shapes():
    backend = ShapeOnlyBackend()
    model = meta_model("mar_tiny")
    sampler = Sampler(model, load_policy("baseline", ["sampler.head_steps=2"]), backend=backend)
    result = sampler.generate(num_images=2, seed=0, batch_size=2)
    assert result.tokens.shape == (2, model.seq_len, model.token_embed_dim)


def test_accumulator_per_step_sums_to_total(tiny_costs):
    acc = FlopAccumulator(tiny_costs)
    acc.add(_Record([TransformerRun(2, 16, 16, 2)], [TransformerRun(2, 32, 32, 2)], {5: 4}, step=0))
    acc.add(_Record([TransformerRun(2, 20, 20, 2)], [TransformerRun(2, 32, 32, 2)], {5: 8}, step=1))
    acc.add_images(1)
    s = acc.summary(per_step=True)
    assert sum(r["total"] for r in s["per_step"]) == pytest.approx(s["tflops_per_image"])
    assert s["per_step"][1]["head"] == pytest.approx(2 * s["per_step"][0]["head"])


def test_cli_json(capsys):
    assert main(["flops", "--model", "mar_tiny", "--json", "--head-steps", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("tflops_per_image", "baseline_tflops_per_image", "flops_ratio", "components"):
        assert key in out
    assert out["flops_ratio"] == 1.0
    assert out["sampler"]["head_steps"] == 10


def test_cli_table_and_policy_override(capsys):
    assert main(["flops", "--model", "mar_tiny", "sampler.head_steps=25"]) == 0
    out = capsys.readouterr().out
    assert "encoder" in out and "total" in out and "4.00x" in out  # head 100 -> 25 steps


@pytest.mark.parametrize("argv, message", [
    (["flops", "--model", "nope"], "not a registered model"),
    (["flops", "--model", "mar_tiny", "--cfg", "0.5"], "--cfg"),
    (["flops", "--model", "mar_tiny", "--policy", "/nonexistent.yaml"], "policy"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_narrowed_block_counts_attention_and_mlp_halves(tiny_costs):
    """A block narrowed between its halves (LazyMAR): attention on q queries over k keys, MLP on m."""
    q, k, m = 20, 32, 6
    attention = 2 * (q * 4 * D * D + q * k * 2 * D)
    mlp = 2 * (m * 2 * D * HIDDEN)
    assert sum(tiny_costs.block("decoder", q, k, mlp_queries=m).values()) == attention + mlp
    with pytest.raises(ValueError):
        tiny_costs.block("decoder", 5, 32, mlp_queries=6)


def _shipped(name):
    return load_policy(name, ["sampler.head_steps=30", "sampler.num_iter=12"])


@pytest.mark.parametrize("name", ["recap", "lazymar"])
def test_cached_plans_cross_check_and_shape_only(name):
    """Partial passes over cached K/V: the accounting equals FlopCounterMode on the real run, and the
    shape-only count (meta model) equals the executed one."""
    policy = _shipped(name)
    torch.manual_seed(0)
    # deep enough for the shipped defaults (LazyMAR selects at decoder layer 3, skips head blocks 1-4)
    config = dict(model_config("mar_tiny"), decoder_depth=4, diffloss_d=6)
    model = create_model(config)
    sampler = Sampler(model, policy)
    sampler.generate(labels=[3, 4], num_images=2, seed=0, batch_size=2)
    with flop_counter_mode() as counter:
        report = sampler.generate(labels=[3, 4], num_images=2, seed=0, batch_size=2).report
    section = report["engagement"]["flops"]
    executed = section["components"]["encoder"]["flops"] + section["components"]["decoder"]["flops"] \
        + section["head_executed_tflops_per_image"] * 1e12 * section["images"]
    assert executed == pytest.approx(counter.get_total_flops(), rel=1e-9)
    shape_only = policy_flops(meta_model(config), policy, num_images=2, batch_size=2)
    assert shape_only["tflops_per_image"] == pytest.approx(section["tflops_per_image"], rel=1e-12)
    baseline = policy_flops(meta_model(config), load_policy("baseline", ["sampler.head_steps=30", "sampler.num_iter=12"]), num_images=2, batch_size=2)
    transformer = lambda s: s["components"]["encoder"]["flops"] + s["components"]["decoder"]["flops"]  # noqa: E731
    assert transformer(baseline) > transformer(section)  # the cached passes saved encoder/decoder work
