"""Hostile and careless input, per class: refusals exit 2 with exactly one line, no traceback and nothing
half-written; resumed evals after each corruption give the metrics of an uninterrupted run.

The cases come from ``tests/hostile_inputs.py`` and ``tests/hostile_outputs.py``; ``tests/hostile.py`` runs
and classifies them (``python tests/hostile.py`` runs the whole catalogue and prints the totals);
here a subset of every class runs, chosen to cover each distinct guard while keeping the suite fast.
"""

import argparse
import json
import threading
import time

import numpy as np
import pytest
import torch

import hostile
from hostile_inputs import _Evil
from marcache.errors import CheckpointError, MarcacheError
from marcache.evaluation import sharded
from marcache.loading import read_state_dict

CASES = {c.id: c for c in hostile.all_cases()}


@pytest.fixture(scope="module", autouse=True)
def _imports_done():
    """Lazy imports done before any case runs under its alarm (see hostile.warm_up)."""
    hostile.warm_up()

#: per class, the cases run by the test suite (the script runs all of them)
SELECTED = {
    "weights": ["weights-nan-class-emb", "weights-inf-class-emb", "weights-nan-pth", "weights-overflow-1e30"],
    "settings": ["override-sampler.cfg=inf", "override-sampler.cfg=1e308", "override-sampler.temperature=.inf",
                 "override-sampler.cfg=nan", "policy-temperature-inf", "policy-cfg-nan"],
    "plugin-params": ["param-gtr-rates-nan", "param-gtr-rates-huge", "param-gtr-order-70", "param-gtr-order-100000",
                      "param-params-list", "param-validate-params-list", "param-fts-beta-inf",
                      "param-head-threshold-nan", "param-override-gtr_order.num_stages=70"],
    "policy": ["policy-dup-plugin", "policy-plugins-mapping", "policy-oc-env", "policy-validate-oc-env",
               "policy-override-oc-env", "policy-oc-decode", "policy-yaml-syntax", "policy-huge-anchors",
               "policy-disable-forward"],
    "checkpoint": ["checkpoint-pickle-exec", "checkpoint-raw-pickle-exec", "checkpoint-namespace-entry",
                   "checkpoint-list-entry", "checkpoint-empty", "checkpoint-truncated-safetensors",
                   "checkpoint-int-tensor"],
    "arguments": ["arg-num-images-huge", "arg-labels-huge-repeat", "arg-labels-overflow", "eval-arg-num-samples-huge",
                  "eval-arg-shard-size-0"],
    "output": ["out-existing-file", "out-under-file", "out-dev-null", "out-empty-string", "out-disk-full-0",
               "out-disk-full-5000", "eval-out-existing-file", "eval-disk-full-3000"],
    "resume": ["resume-truncated-shard", "resume-garbage-shard", "resume-zeroed-images",
               "resume-fewer-images-than-ids", "resume-altered-labels", "resume-stale-tmp", "resume-manifest-garbage",
               "resume-manifest-list"],
}


def test_selection_names_existing_cases_of_their_class():
    for kind, ids in SELECTED.items():
        for case_id in ids:
            assert CASES[case_id].kind == kind, case_id


@pytest.mark.parametrize("case_id", [c for ids in SELECTED.values() for c in ids])
def test_hostile_case_is_clean(case_id, tmp_path):
    case = CASES[case_id]
    outcome_class, detail, outcome = hostile.run_case(case, tmp_path)
    assert outcome_class == "clean", f"{case_id}: {outcome_class}: {detail}"
    if case.expect == "refuse":  # spelled out: exit 2, one line, no traceback, nothing half-written
        lines = outcome.stderr.strip().splitlines()
        assert outcome.rc == 2 and len(lines) == 1 and "Traceback" not in outcome.stderr
        assert hostile.half_written(tmp_path / case_id / "out", case.ignore) is None


def test_refused_generate_writes_nothing(tmp_path):
    """Inputs are validated before the output folder is created."""
    case = CASES["weights-nan-class-emb"]
    hostile.run_case(case, tmp_path)
    assert not (tmp_path / case.id / "out").exists()


def test_disk_full_leaves_only_complete_files(tmp_path):
    case = CASES["out-disk-full-5000"]
    outcome_class, _, outcome = hostile.run_case(case, tmp_path)
    out = tmp_path / case.id / "out"
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert outcome_class == "clean" and "no space left" in outcome.stderr
    assert all(not name.startswith(".") for name in written)  # no temporary files
    assert hostile.half_written(out) is None


# --------------------------------------------------------------------------- guards, one by one
def test_finite_check_names_policy_and_step(tiny_model):
    from marcache.scheduler import Sampler

    model = tiny_model
    sampler = Sampler(model, "baseline", overrides=["sampler.num_iter=3", "sampler.head_steps=2"])
    saved = model.diffloss.net.final_layer.linear.bias.detach().clone()
    try:
        with torch.no_grad():
            model.diffloss.net.final_layer.linear.bias.fill_(float("nan"))
        with pytest.raises(MarcacheError, match=r"policy 'baseline' produced non-finite tokens .* at step 0 of 3"):
            sampler.generate(labels=[1, 2], seed=0)
    finally:
        with torch.no_grad():
            model.diffloss.net.final_layer.linear.bias.copy_(saved)
    assert torch.isfinite(sampler.generate(labels=[1, 2], seed=0).tokens).all()


@pytest.mark.parametrize("entry", [argparse.Namespace(a=1), [torch.zeros(2)], torch.zeros(2), None, "text"])
def test_odd_checkpoint_entries_are_one_line(tmp_path, entry):
    path = tmp_path / "odd.pth"
    torch.save({"model_ema": entry}, path)
    with pytest.raises(CheckpointError, match="entry 'model_ema' is a .*, not a state dict") as info:
        read_state_dict(path)
    assert "\n" not in str(info.value)


def test_pickle_refusal_says_what_and_what_to_do(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model_ema": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "system" in message and "safetensors" in message and "--weights" in message
    assert not (tmp_path / "pwned").exists()


def test_report_json_is_standard_json():
    from marcache.fileio import write_json_atomic

    def no_constants(name):
        raise ValueError(name)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = write_json_atomic(Path(d) / "r.json", {"a": float("inf"), "b": [float("nan"), 1.5]})
        assert json.loads(path.read_text(), parse_constant=no_constants) == {"a": "inf", "b": [None, 1.5]}


# --------------------------------------------------------------------------- eval shards: digests and locks
class _StubSampler:
    """Deterministic 'images' from the sample ids: enough to test the shard bookkeeping."""

    def __init__(self):
        self.model = argparse.Namespace(num_classes=10)
        self.calls = []

    def generate(self, labels, num_images, seed, batch_size, sample_offset):
        self.calls.append(sample_offset)
        ids = torch.arange(sample_offset, sample_offset + num_images)
        tokens = ids.float().view(-1, 1, 1, 1).expand(-1, 2, 2, 1).contiguous()
        return argparse.Namespace(tokens=tokens, sample_ids=ids, report={"seconds": 0.01})


def _shards(out, sampler=None, **kw):
    sampler = sampler or _StubSampler()
    sharded.prepare_manifest(out, {"run": 1}, sharded.DistInfo())
    stats = sharded.generate_shards(sampler, out, 6, 0, 2, 2, to_uint8=lambda t: t.to(torch.uint8).numpy(), **kw)
    return sampler, stats


def test_manifest_records_a_digest_per_shard_and_resume_verifies_it(tmp_path, capfd):
    _, stats = _shards(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1", "2"] and stats["generated"] == [0, 1, 2]
    # alter shard 1's content (a valid npz): the digest catches it and only that shard is regenerated
    with np.load(tmp_path / "shard-00001.npz") as z:
        data = {k: z[k] for k in z.files}
    np.savez(tmp_path / "shard-00001.npz", **(data | {"images": np.zeros_like(data["images"])}))
    sampler, stats = _shards(tmp_path)
    assert stats["generated"] == [1] and stats["skipped"] == [0, 2] and sampler.calls == [2]
    assert "shard-00001.npz does not match the digest" in capfd.readouterr().err
    assert sharded.collect(tmp_path, 6, 2)["images"][2:4].max() > 0


class _SlowSampler(_StubSampler):
    def __init__(self, started: threading.Event):
        super().__init__()
        self.started = started

    def generate(self, *args, **kwargs):
        self.started.set()
        time.sleep(1.0)
        return super().generate(*args, **kwargs)


def test_second_evaluator_waits_for_a_locked_shard_instead_of_generating_it(tmp_path):
    to_uint8 = lambda t: t.to(torch.uint8).numpy()  # noqa: E731
    sharded.prepare_manifest(tmp_path, {"run": 1}, sharded.DistInfo())
    started = threading.Event()
    first = _SlowSampler(started)  # generates shard 0 (samples 0, 1), slowly, holding its lock
    holder = threading.Thread(target=lambda: sharded.generate_shards(first, tmp_path, 2, 0, 2, 2, to_uint8=to_uint8))
    holder.start()
    assert started.wait(30)
    second = _StubSampler()
    stats = sharded.generate_shards(second, tmp_path, 4, 0, 2, 2, to_uint8=to_uint8)
    holder.join()
    assert first.calls == [0] and second.calls == [2]  # each shard generated once
    assert stats["generated"] == [1] and stats["skipped"] == [0]
    assert sharded.collect(tmp_path, 4, 2)["sample_ids"].tolist() == [0, 1, 2, 3]


def test_stale_temporary_shards_are_removed(tmp_path):
    _shards(tmp_path)
    (tmp_path / "shard-00001.tmp4242.npz").write_bytes(b"partial")
    (tmp_path / ".shard-00002.npz.tmp77").write_bytes(b"partial")
    _, stats = _shards(tmp_path)
    assert stats["generated"] == [] and not list(tmp_path.glob("*tmp*")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("text", ["{", "", "[1]", '{"description": 3}'])
def test_corrupt_manifest_is_one_line_with_the_fix(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(MarcacheError, match="delete .*manifest.json to regenerate every shard") as info:
        sharded.prepare_manifest(tmp_path, {"run": 1}, sharded.DistInfo())
    assert "\n" not in str(info.value)
