"""The CUDA backend: on CPU its graph bodies run eagerly on the same static buffers and are checked
against the reference backend exactly; the captured-graph tests need a GPU and skip without one."""

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from marcache.backends import CudaBackend, ReferenceBackend, auto_backend_name, get_backend
from marcache.backends.cuda import DEFAULT_BUCKETS, ChainKey, HeadChainRunner, row_bucket
from marcache.cli import main
from marcache.policy import load_policy
from marcache.scheduler import Sampler
from marcache.testing import HostSyncGuard
from conftest import make_tiny, rel_err

POLICY_FILES = sorted((Path(__file__).parents[1] / "policies").glob("*.yaml"))
SHORT = ["sampler.num_iter=8", "sampler.head_steps=20"]
needs_cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest); benchmarks/gpu_check.py runs these


@pytest.fixture(scope="module")
def model():
    # deep enough for every shipped policy (LazyMAR selects at decoder layer 3, skips head blocks 1-4)
    return make_tiny(4, decoder_depth=4, diffloss_d=6)


def generate(model, policy, backend, labels=(1, 5, 7, 2), overrides=SHORT, seed=0):
    sampler = Sampler(model, load_policy(policy, overrides), backend=backend)
    return sampler.generate(labels=list(labels), seed=seed)


# ---------------------------------------------------------------------------- bucketing
@given(st.integers(1, 5000))
def test_row_bucket_is_the_smallest_fitting_bucket(rows):
    size = row_bucket(rows)
    assert size >= rows
    if rows <= DEFAULT_BUCKETS[-1]:
        assert size in DEFAULT_BUCKETS and all(b < rows for b in DEFAULT_BUCKETS if b < size)
    else:
        assert size % DEFAULT_BUCKETS[-1] == 0 and size - rows < DEFAULT_BUCKETS[-1]


def test_bad_buckets_and_graphs_without_cuda_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        CudaBackend(torch.device("cpu"), buckets=(8, 4))
    with pytest.raises(ValueError, match="at least one row"):
        row_bucket(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            CudaBackend(torch.device("cpu"), graphs=True)


def test_auto_picks_cuda_only_on_a_cuda_device():
    assert auto_backend_name(torch.device("cpu")) == "reference"
    assert auto_backend_name(torch.device("cuda")) == "cuda"
    assert get_backend("auto", "cpu").name == "reference"
    assert get_backend("cuda", "cpu").name == "cuda"


# ---------------------------------------------------------------------------- exactness on CPU
@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.stem)
def test_every_policy_matches_the_reference_backend_exactly(path, model):
    reference = generate(model, str(path), ReferenceBackend(torch.device("cpu")))
    cuda = CudaBackend(torch.device("cpu"))
    fast = generate(model, str(path), cuda)
    assert torch.equal(fast.tokens, reference.tokens)
    assert fast.report["flops"] == reference.report["flops"]
    if "lazymar" not in path.stem:  # LazyMAR's head caches run eagerly; every other chain is padded
        assert cuda.runners, "the head ran through the static runners"


def test_bfloat16_autocast_matches_the_reference_backend(model):
    reference = generate(model, "gtr_fts", ReferenceBackend(torch.device("cpu"), "bfloat16"))
    fast = generate(model, "gtr_fts", CudaBackend(torch.device("cpu"), "bfloat16"))
    assert torch.equal(fast.tokens, reference.tokens)


def test_static_buffers_are_reused_across_steps_and_batches(model):
    backend = CudaBackend(torch.device("cpu"))
    generate(model, "baseline", backend)
    buffers = {key: (r.z.data_ptr(), r.noise.data_ptr(), r.out.data_ptr(), r.calls) for key, r in backend.runners.items()}
    generate(model, "baseline", backend, labels=(3, 3, 8, 0), seed=4)
    assert set(backend.runners) == set(buffers), "no new chain shapes for the same plan"
    for key, runner in backend.runners.items():
        z, noise, out, calls = buffers[key]
        assert (runner.z.data_ptr(), runner.noise.data_ptr(), runner.out.data_ptr()) == (z, noise, out)
        assert runner.calls > calls
    # 8 steps, cosine schedule, 4 samples: every chain shape is a bucket of the step's rows
    for key in backend.runners:
        assert key.rows in DEFAULT_BUCKETS and key.steps == 20


def test_padding_rows_never_reach_the_real_rows(model):
    head = model.diffloss
    runner = HeadChainRunner(head, ChainKey(8, 10, True, False), torch.device("cpu"), ReferenceBackend(torch.device("cpu")).autocast, False)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, head.net.cond_embed.in_features, generator=g), torch.randn(5, head.net.cond_embed.in_features, generator=g)
    noise = torch.randn(5, 11, head.in_channels, generator=g)
    first = runner(cond, uncond, noise, 2.5, 0.9).clone()
    runner.z.normal_(generator=g)  # garbage left in the static buffers from an earlier chain
    runner.noise.normal_(generator=g)
    assert torch.equal(runner(cond[:3], uncond[:3], noise[:3], 2.5, 0.9), first[:3])
    assert torch.equal(runner(cond, uncond, noise, 2.5, 0.9), first)
    plain = head.sample_with_noise(torch.cat([cond, uncond]), noise, 0.9, 2.5, steps=10)
    assert torch.equal(first, plain)
    with pytest.raises(ValueError, match="do not fit"):
        runner(torch.zeros(9, cond.shape[1]), torch.zeros(9, cond.shape[1]), torch.zeros(9, 11, head.in_channels), 2.5, 1.0)


@torch.no_grad()
def test_position_gathers_equal_the_official_boolean_indexing(model):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(3, model.seq_len, model.token_embed_dim, generator=g)
    mask = torch.zeros(3, model.seq_len)
    for row in mask:
        row[torch.randperm(model.seq_len, generator=g)[:9]] = 1
    emb = model.class_emb(torch.tensor([0, 4, 9]))
    official = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, emb), mask)
    gathered = model.forward_mae_decoder(model.forward_mae_encoder(tokens, mask, emb, 9), mask, 9)
    assert torch.equal(gathered, official)


def test_precomputed_time_embeddings_equal_the_chain_s(model):
    head = model.diffloss
    runner = HeadChainRunner(head, ChainKey(4, 25, False, False), torch.device("cpu"), ReferenceBackend(torch.device("cpu")).autocast, False)
    sched = head.schedule(25)
    for j, emb in enumerate(runner.time_embeddings):
        t = sched.timestep_map[sched.num_timesteps - 1 - j]
        assert torch.equal(emb, head.net.time_embed(t.reshape(1)))


def test_cli_backend_flag(tmp_path, capsys):
    assert main(["generate", "--num-images", "2", "--backend", "cuda", "--out", str(tmp_path / "o"), "--no-progress",
                 "sampler.num_iter=4", "sampler.head_steps=10"]) == 0
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["backend"]["name"] == "cuda" and report["backend"]["head_chains"] >= 1
    assert main(["generate", "--backend", "tpu", "--out", str(tmp_path / "x")]) == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- on a GPU
@needs_cuda
@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.stem)
def test_graphs_match_the_reference_backend_on_cuda(path):
    gpu_model = make_tiny(4, decoder_depth=4, diffloss_d=6).cuda()
    reference = generate(gpu_model, str(path), ReferenceBackend(torch.device("cuda")))
    backend = CudaBackend(torch.device("cuda"))
    fast = generate(gpu_model, str(path), backend)
    assert backend.graphs
    assert rel_err(fast.tokens, reference.tokens) < 1e-4
    again = generate(gpu_model, str(path), backend)  # replayed graphs: same images
    assert torch.equal(again.tokens, fast.tokens)


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graphs_with_autocast_stay_within_dtype_tolerance(dtype):
    gpu_model = make_tiny(4, decoder_depth=4, diffloss_d=6).cuda()
    reference = generate(gpu_model, "baseline", ReferenceBackend(torch.device("cuda"), dtype))
    fast = generate(gpu_model, "baseline", CudaBackend(torch.device("cuda"), dtype))
    assert rel_err(fast.tokens, reference.tokens) < 5e-2


@needs_cuda
def test_no_host_sync_inside_a_baseline_step():
    """Between the forward plan and the end of a step nothing waits for the device."""
    gpu_model = make_tiny(4).cuda()
    backend = CudaBackend(torch.device("cuda"))
    policy = load_policy("baseline", SHORT)
    Sampler(gpu_model, policy, backend=backend).generate(labels=[1, 2], seed=0)  # captures the graphs
    guard = HostSyncGuard()
    try:
        Sampler(gpu_model, policy, backend=backend, extra_plugins=[guard]).generate(labels=[1, 2], seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.engagement["guarded_steps"] == 8, "the guard watched every step"


def test_backend_benchmark_harness_runs(tmp_path):
    """benchmarks/backends.py (the GPU evidence script) runs end to end on CPU on a tiny model."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from backends import main as bench_main

    report = bench_main(["--model", "mar_tiny", "--batch-sizes", "2", "--policies", "baseline,gtr_fts", "--device", "cpu",
                         "--dtype", "float32", "--num-iter", "4", "--head-steps", "10", "--repeats", "1", "--warmup", "0",
                         "--out", str(tmp_path)])
    labels = [r["row"] for r in report["rows"]]
    assert labels == ["official", "baseline/reference", "baseline/cuda", "gtr_fts/reference", "gtr_fts/cuda"]
    assert report["rows"][0]["speedup_vs_official"] == 1.0
    assert all(r["seconds"] > 0 for r in report["rows"])
    assert "| 2 | baseline/cuda |" in (tmp_path / "backends.md").read_text()
