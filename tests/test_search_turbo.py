"""benchmarks/search_turbo.py end to end on the shipped mar_mnist (a few samples): one process per seed,
then the table from both; fidelity for every candidate, judged only where the order is kept."""

import json
from pathlib import Path

import pytest

from conftest import load_benchmark
from hostile import cache_root

POLICIES = Path(__file__).resolve().parents[1] / "policies"


@pytest.fixture(scope="module")
def search_turbo():
    return load_benchmark("search_turbo")


def test_every_shipped_policy_is_a_candidate(search_turbo):
    shipped = {p.stem for p in POLICIES.glob("*.yaml")} - {"baseline"}
    names = {k.split(" ")[1] for k in search_turbo.CANDIDATES if k.startswith("shipped: ")}
    assert shipped <= names | {v for v in search_turbo.CANDIDATES.values() if isinstance(v, str)}
    # DiSA's release fixes 64 AR steps, more than mar_mnist's 49 tokens: it runs at the model's step count
    disa = search_turbo.as_policy(search_turbo.CANDIDATES["shipped: disa (its 64 AR steps -> the model's)"])
    assert disa.config.sampler.num_iter is None and disa.plugin_configs[0][1].upper_steps == 50


def test_per_seed_processes_then_table(search_turbo, tmp_path):
    common = ["--num-samples", "6", "--batch-size", "3", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
              "--cache-root", str(cache_root()), "--only", "shipped: recap", "shipped: halton"]
    for seed in ("0", "1"):  # as two processes would, one per core
        assert search_turbo.main([*common, "--seeds", seed]) == 0
    assert not (tmp_path / "out" / "pareto.md").exists()  # one seed: no spread, no table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 6  # 3 policies x 2 seeds, neither process lost the other's rows
    shards = sorted((tmp_path / "work").rglob("*.npz"))
    table_only = [*common[:common.index("--only") + 1], "--seeds", "0,1"]  # `--only` and no names: the table
    assert search_turbo.main(table_only) == 0
    assert sorted((tmp_path / "work").rglob("*.npz")) == shards  # nothing sampled again, no other candidate run
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            (tmp_path / "out" / "pareto.md").read_text().splitlines() if line.startswith("| ")}
    header = rows.pop("policy")
    col = {name.strip("| "): i for i, name in enumerate(header)}
    assert rows["shipped: recap"][col["same order"]] == "yes"
    assert rows["shipped: halton"][col["same order"]] == "no"
    for name in ("shipped: recap", "shipped: halton"):
        value, verdict = rows[name][col["recall"]].split(" ")
        assert 0 <= float(value) <= 1 and verdict in ("tie", "better", "worse")
        assert float(rows[name][col["PSNR"]]) > 0 and 0 < float(rows[name][col["SSIM"]]) <= 1
