"""MNIST evaluation: classifier + torch-fidelity extractor offline, cached reference statistics,
`marcache eval --json` fields, sharded generation that resumes after a kill without loss or duplicates."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from marcache.cli import main
from marcache.data import load_mnist
from marcache.errors import ConfigError, MarcacheError
from marcache.evaluation import features, metrics, reference, sharded
from marcache.evaluation.classifier import load_classifier, predict
from marcache.models.registry import create_model
from marcache.scheduler import Sampler

from conftest import perturb


@pytest.fixture(scope="session")
def fidelity_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fidelity")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(create_model("mar_tiny"), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_shipped_classifier_is_accurate_offline():
    x, y = load_mnist("test")
    _, logits = predict(load_classifier(), x[:2000])
    assert (logits.argmax(1).numpy() == y[:2000]).mean() >= 0.98


def test_extractor_registers_once_and_returns_features_in_order():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = features.register()
    assert features.register() == name and name in FEATURE_EXTRACTORS_REGISTRY
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    ext = cls(name, ["logits", "feat"]).eval()
    x = torch.from_numpy(load_mnist("test")[0][:5]).unsqueeze(1).expand(5, 3, 28, 28).contiguous()
    logits, feat = ext(x)
    assert logits.shape == (5, 10) and feat.shape == (5, 128)
    assert list(logits.argmax(1)) == [7, 2, 1, 0, 4]


def test_reference_stats_cached_offline(fidelity_cache, monkeypatch):
    monkeypatch.delenv("MARCACHE_REFERENCE_SIZE")  # the full 10,000-image reference, as users get it
    assert len(reference.reference_dataset()) == reference.TEST_SET_SIZE
    x, y = load_mnist("train")
    real = metrics.score_images(x[:300], y[:300], cache_root=fidelity_cache)
    assert all(p.is_file() for p in reference.reference_files(fidelity_cache))
    assert real["class_accuracy"] > 0.97 and real["fid"] < 30  # small-N bias: 300 real images score about 12
    # second call: the reference comes from the cache, the MNIST test images are never read
    monkeypatch.setattr(reference, "reference_dataset", lambda: reference.UInt8Images(np.zeros((2, 28, 28), np.uint8)))
    again = metrics.score_images(x[:300], y[:300], cache_root=fidelity_cache)
    assert again["fid"] == pytest.approx(real["fid"], rel=1e-9)
    assert again["precision"] == pytest.approx(real["precision"], rel=1e-9)


def test_reference_subset_is_named_and_validated(monkeypatch):
    monkeypatch.setenv("MARCACHE_REFERENCE_SIZE", "250")
    assert len(reference.reference_dataset()) == 250
    assert "-first250-" in reference.reference_name() and reference.mnist_reference_label() == "mnist-test-first250"
    monkeypatch.delenv("MARCACHE_REFERENCE_SIZE")
    assert "first" not in reference.reference_name() and reference.mnist_reference_label() == "mnist-test"
    for bad in ("1", "10001", "abc"):
        monkeypatch.setenv("MARCACHE_REFERENCE_SIZE", bad)
        with pytest.raises(ConfigError, match="MARCACHE_REFERENCE_SIZE"):
            reference.reference_dataset()


def test_bad_reference_size_stops_eval_before_generating(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MARCACHE_REFERENCE_SIZE", "0")
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_checkpoint), "--num-samples", "4",
               "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "MARCACHE_REFERENCE_SIZE='0'" in err[0]
    assert not (tmp_path / "e").exists()


def test_metrics_separate_real_from_noise():
    x, y = load_mnist("train")
    ref = load_mnist("test")[0][:400]
    real = metrics.score_images(x[:400], y[:400], reference_images=ref)
    rng = np.random.default_rng(0)
    noise = metrics.score_images(rng.integers(0, 256, (400, 28, 28), dtype=np.uint8), y[:400], reference_images=ref)
    assert real["fid"] < noise["fid"] / 10 and real["kid"] < noise["kid"] / 10
    assert real["class_accuracy"] > 0.97 and noise["class_accuracy"] < 0.5
    assert real["precision"] > 0.5 and real["recall"] > 0.5 and noise["precision"] < 0.1
    assert real["inception_score"] > 5 > noise["inception_score"]


def test_eval_json_fields(tiny_checkpoint, fidelity_cache, capsys, tmp_path):
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_checkpoint), "--num-samples", "20",
               "--batch-size", "10", "--seed", "1", "--cache-root", str(fidelity_cache), "--out", str(tmp_path / "e"),
               "--json", "--no-progress", "sampler.num_iter=4", "sampler.head_steps=10"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("fid", "kid", "precision", "recall", "inception_score", "class_accuracy", "images_per_second"):
        assert isinstance(out[key], float) and np.isfinite(out[key]), key
    assert out["num_samples"] == 20 and out["seed"] == 1
    assert out["policy"]["sampler"]["num_iter"] == 4 and out["policy"]["sampler"]["head_steps"] == 10
    assert 0.0 <= out["class_accuracy"] <= 1.0 and out["images_per_second"] > 0
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["description"]["num_samples"] == 20


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "1"], "--num-samples"),
    (["--policy", "/nonexistent.yaml"], "nonexistent"),
])
def test_eval_bad_input_one_line(tiny_checkpoint, capsys, argv, message):
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_checkpoint)] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def _sampler(tiny_checkpoint):
    from marcache.loading import load_mar

    return Sampler(load_mar("mar_tiny", tiny_checkpoint), "baseline", overrides=["sampler.num_iter=4", "sampler.head_steps=8"])


def test_killed_run_resumes_without_loss_or_duplicates(tiny_checkpoint, tmp_path):
    n, shard, bs = 26, 6, 4
    full = tmp_path / "full"
    sharded.generate_shards(_sampler(tiny_checkpoint), full, n, 5, shard, bs)
    want = sharded.collect(full, n, shard)
    assert list(want["sample_ids"]) == list(range(n)) and list(want["labels"]) == [i % 10 for i in range(n)]

    class Killed(Exception):
        pass

    def kill_after(k):
        if k == 1:
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        sharded.generate_shards(_sampler(tiny_checkpoint), part, n, 5, shard, bs, after_shard=kill_after)
    # a half-written shard left by the kill must be ignored
    (part / "shard-00002.tmp999.npz").write_bytes(b"garbage")
    with pytest.raises(MarcacheError, match="shard 2 is missing"):
        sharded.collect(part, n, shard)
    stats = sharded.generate_shards(_sampler(tiny_checkpoint), part, n, 5, shard, bs)
    assert stats["skipped"] == [0, 1] and stats["generated"] == [2, 3, 4]
    got = sharded.collect(part, n, shard)
    assert np.array_equal(got["images"], want["images"]) and np.array_equal(got["sample_ids"], want["sample_ids"])
    # the shard assignment of a 3-rank run covers every shard exactly once
    owned = sorted(k for r in range(3) for k in range(5) if k % 3 == r)
    assert owned == list(range(5))


def test_manifest_mismatch_is_refused(tiny_checkpoint, tmp_path):
    info = sharded.DistInfo()
    sharded.prepare_manifest(tmp_path, {"seed": 1, "num_samples": 10}, info)
    with pytest.raises(MarcacheError, match="different run"):
        sharded.prepare_manifest(tmp_path, {"seed": 2, "num_samples": 10}, info)
