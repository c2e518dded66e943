"""marcache bench: rows, matched fewer-steps baselines, derived figures, --eval plumbing, plot, CLI errors.

No assertion on speed (timings are measured by the command, not tested)."""

from __future__ import annotations

import statistics
import sys
import types

import pytest

import marcache.cli as cli
from marcache.bench import BenchConfig, StepGrid, format_table, plot, run_bench
from marcache.flops import policy_flops
from marcache.models import create_model
from marcache.policy import load_policy


@pytest.fixture(autouse=True)
def _only_our_commands(monkeypatch):
    # the CLI parser imports every registered command module; keep this test independent of others'
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["marcache.flops.command", "marcache.bench.command"])


@pytest.fixture(scope="module")
def model():
    return create_model("mar_tiny", num_sampling_steps="6")  # 8 AR steps x 6 head steps: fast


@pytest.fixture
def policies(tmp_path):
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text("name: four_steps\nsampler:\n  num_iter: 4\n")
    head = tmp_path / "head.yaml"
    head.write_text("name: three_head\nsampler:\n  head_steps: 3\n")
    return str(fewer), str(head)


def _config(policies=(), **kw):
    base = dict(model="mar_tiny", batch_size=2, num_images=2, warmup=1, repeats=2, seed=0, match=("ar", "head"),
                match_tolerance=0.05, eval=False, eval_samples=4)
    base.update(kw)
    return BenchConfig(policies=tuple(policies), **base)


def test_rows_and_matched_baselines(model, policies):
    report = run_bench(model, _config(policies), log=lambda *a: None)
    rows = {r["label"]: r for r in report["rows"]}
    base = rows["baseline"]
    assert base["flops_ratio"] == 1.0 and base["wallclock_speedup"] == 1.0
    assert rows["four_steps"]["sampler"]["num_iter"] == 4
    assert rows["four_steps"]["executed"] == {"ar_steps": 4, "mean_head_steps": 6}
    assert rows["three_head"]["executed"] == {"ar_steps": 8, "mean_head_steps": 3}
    # the plain sampler with 4 AR steps is an exact FLOPs match of a 4-step policy
    ar = [r for r in report["rows"] if r["kind"] == "fewer_ar_steps" and r["matched_to"] == "four_steps"]
    assert len(ar) == 1 and ar[0]["sampler"]["num_iter"] == 4 and ar[0]["match_error"] == pytest.approx(0, abs=1e-12)
    head = [r for r in report["rows"] if r["kind"] == "fewer_head_steps" and r["matched_to"] == "three_head"]
    assert len(head) == 1 and head[0]["sampler"]["head_steps"] == 3 and head[0]["sampler"]["num_iter"] == 8
    # every fewer-steps row is within the tolerance; a setting that misses is reported, not measured
    for r in report["rows"]:
        if r["matched_to"]:
            assert r["match_error"] <= 0.05
    for u in report["unmatched"]:
        assert abs(u["closest_tflops_per_image"] / u["target_tflops_per_image"] - 1) > 0.05
    for r in report["rows"]:
        assert len(r["seconds"]["all"]) == 2
        med = statistics.median(r["seconds"]["all"])
        assert r["images_per_second"] == pytest.approx(2 / med)
        assert r["achieved_gflops"] == pytest.approx(r["tflops_per_image"] * 1e3 * 2 / med)
        assert r["flops_ratio"] == pytest.approx(base["tflops_per_image"] / r["tflops_per_image"])
        assert r["peak_memory_bytes"] > 0
    assert rows["four_steps"]["flops_ratio"] > 1.0 and rows["three_head"]["flops_ratio"] > 1.0
    assert report["matmul_gflops"] > 0
    table = format_table(report)
    assert all(label[:35] in table for label in rows)


def test_mixed_match_reduces_both(model):
    grid = StepGrid(model, [])
    n, h, achieved = grid.match_mixed(grid.tflops(4, 3), 8, 6)
    assert (n, h) == (4, 3) and achieved == grid.tflops(4, 3)


def test_step_grid_is_exact(model):
    grid = StepGrid(model, [])
    for n, h in [(3, 6), (8, 4)]:
        s = policy_flops(model, load_policy("baseline", [f"sampler.num_iter={n}", f"sampler.head_steps={h}"]))
        assert grid.tflops(n, h) == pytest.approx(s["tflops_per_image"], rel=1e-12)
    n, achieved = grid.match_ar(grid.tflops(5, 6), 8, 6)
    assert n == 5


def test_eval_rows_and_fid_plot(model, policies, monkeypatch, tmp_path):
    calls = []

    def fake_evaluate(model_, policy, num_samples, seed, batch_size):
        calls.append((policy.config.sampler.num_iter, num_samples, seed, batch_size))
        return {"fid": 10.0 + len(calls), "recall": 0.6 if len(calls) < 5 else 0.4 + 0.001 * len(calls), "class_accuracy": 0.9}

    monkeypatch.setitem(sys.modules, "marcache.evaluation", types.SimpleNamespace(evaluate=fake_evaluate))
    report = run_bench(model, _config([policies[0]], eval=True, match=("ar",), repeats=1), log=lambda *a: None)
    assert len(calls) == 2 * len(report["rows"]) == 6  # every row at seeds 0 and 1
    assert [c[1:] for c in calls[:2]] == [(4, 0, 2), (4, 1, 2)]
    rows = [r["eval"] for r in report["rows"]]
    assert [r["fid"] for r in rows] == [11.5, 13.5, 15.5] and all(r["fid_spread"] == 1.0 for r in rows)
    # the baseline ties itself; the others are further from it than the seed spread
    assert [r["vs_baseline"] for r in rows] == ["tie", "worse", "worse"]
    # recall has its own spread (0 for the first two rows, 0.001 for the last): equal recall ties, 0.2 less is worse
    assert [r["recall_vs_baseline"] for r in rows] == ["tie", "tie", "worse"]
    assert "FID" in format_table(report) and "worse" in format_table(report)
    path = plot(report, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--model", "mar_tiny", "--repeats", "0"], "--repeats"),
    (["bench", "--model", "mar_tiny", "--policy", "/nonexistent.yaml"], "policy"),
    (["bench", "--model", "mar_tiny", "sampler.num_iter=4"], "num_iter"),
    (["bench", "--model", "mar_tiny", "--match", "ar,bogus"], "--match"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_json_and_plot(tmp_path, policies, capsys):
    out = tmp_path / "b"
    code = cli.main(["bench", "--model", "mar_tiny", "--policy", policies[1], "--batch-size", "1", "--repeats", "1",
                     "--match", "head", "--json", "--out", str(out)])
    assert code == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in report["rows"]] == ["baseline", "policy", "fewer_head_steps"]
    assert (out / "bench.json").is_file() and (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_config_validates_without_mutating():
    """BenchConfig refuses bad values with one line; from_args leaves the parsed arguments untouched."""
    import argparse

    from marcache.errors import ConfigError

    with pytest.raises(ConfigError, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(ConfigError, match="num_iter"):
        BenchConfig(overrides=("sampler.num_iter=4",))
    args = argparse.Namespace(policy=["a.yaml"], model="mar_tiny", checkpoint=None, weights="model_ema", batch_size=3,
                              num_images=None, warmup=0, repeats=1, seed=0, match="head,ar", match_tolerance=0.1,
                              threads=None, eval=False, eval_samples=1, eval_seeds="0,1", plot=None, out=None, json=False, overrides=[])
    before = dict(vars(args))
    config = BenchConfig.from_args(args)
    assert vars(args) == before  # nothing written back (num_images stays None)
    assert config.images == 3 and config.match == ("head", "ar") and config.policies == ("a.yaml",)
    with pytest.raises(Exception):  # frozen
        config.repeats = 2
