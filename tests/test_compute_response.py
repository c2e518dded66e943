"""benchmarks/compute_response.py runs end to end on a tiny model, and its pass criterion decides right."""

import json

import pytest

from conftest import load_benchmark, make_tiny


@pytest.fixture(scope="module")
def compute_response():
    return load_benchmark("compute_response")


def test_end_to_end_on_tiny_model(compute_response, tmp_path):
    model = make_tiny(7, num_sampling_steps="10")  # 28x28 images: scored in the MNIST classifier space
    model.sampling_defaults = dict(model.sampling_defaults, num_iter=2)
    results = compute_response.measure(model, [1], [5], seeds=[0, 1], num_samples=10, out=tmp_path / "runs",
                                       batch_size=5, cache_root=tmp_path / "cache", progress=False)
    # settings: AR {1, 2 (default)} and head {5, 10 (the default)}, each with both seeds
    assert [(r["sweep"], r["value"], r["default"]) for r in results["rows"]] == [
        ("ar", 1, False), ("ar", 2, True), ("head", 5, False), ("head", 10, True)]
    assert all(set(r["per_seed"]) == {0, 1} for r in results["rows"])
    # the default setting is sampled once and serves both sweeps
    assert sorted(d.name for d in (tmp_path / "runs").iterdir() if d.is_dir()) == ["ar1-s0", "ar1-s1", "ar2-s0", "ar2-s1",
                                                                                   "head5-s0", "head5-s1"]
    assert results["rows"][1]["per_seed"] == results["rows"][3]["per_seed"]
    decision = compute_response.write(results, tmp_path / "docs")
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert saved["verdict"]["passes"] == decision["passes"]
    assert (tmp_path / "docs" / "plot.png").stat().st_size > 1000
    assert "| AR steps | 2 (default) |" in (tmp_path / "docs" / "table.md").read_text()


def _row(sweep, value, fids, default=False):
    return {"sweep": sweep, "value": value, "default": default, "fid_mean": sum(fids) / len(fids),
            "fid_range": max(fids) - min(fids), "per_seed": {i: {"fid": f} for i, f in enumerate(fids)}}


@pytest.mark.parametrize("ar_fids, head_fids, passes", [
    ([[40, 42], [20, 21], [10, 11]], [[30, 31], [10, 11]], True),     # clear, monotone response
    ([[11.5, 12.5], [11, 12], [10, 11]], [[30, 31], [10, 11]], False),  # 1 step within 2x spread of the default
    ([[40, 42], [10, 11], [20, 21]], [[30, 31], [10, 11]], False),    # rises by more than the spread
    ([[40, 42], [20, 21], [10, 11]], [[30, 31], [10, 11], [15, 16]], False),  # worse beyond the default
    ([[40, 42], [20, 21], [10, 11]], [[30, 31], [10, 11], [10.5, 11]], True),  # plateau beyond the default
])
def test_verdict(compute_response, ar_fids, head_fids, passes):
    rows = [_row("ar", v, f, default=(v == 4)) for v, f in zip((1, 2, 4), ar_fids)]
    rows += [_row("head", v, f, default=(v == 50)) for v, f in zip((5, 50, 100), head_fids)]
    assert compute_response.verdict({"rows": rows})["passes"] is passes


def test_seed_zero_is_accepted_and_step_counts_must_be_positive(compute_response):
    assert compute_response._seeds("0,1") == [0, 1]  # the documented default command passes --seeds 0,1
    with pytest.raises(Exception, match=">= 1"):
        compute_response._ints("0,4")
