"""`marcache tune` and the declared search spaces: validation at registration, the space file, pruning of
invalid combinations, unmet budgets (exit 2), kill-and-resume and two workers on one SQLite storage.

All on the random tiny model (4x4 tokens) with 2-4 AR/head steps and 4 calibration images."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

import marcache.plugin as plugin_mod
from marcache.cli import main
from marcache.errors import PluginError
from marcache.plugin import Plugin, available_plugins, register_plugin
from marcache.policy import resolve_policy
from marcache.search_space import Categorical, Float, Int
from marcache.testing import fake_distribution

EXAMPLE = Path(__file__).parents[1] / "examples" / "marcache-head-anneal"
SPACE = {
    "sampler": {"num_iter": {"int": [2, 4]}, "head_steps": {"int": [2, 4]}},
    "plugins": {
        "gtr_order": None,
        "gtr_schedule": {"params": {"head_max": {"int": [2, 4]}, "head_min": {"int": [2, 4]}, "head_rec": {"int": [2, 4]}}},
        "fts": {"requires": ["gtr_schedule"], "params": {"detail_steps": {"int": [2, 4]}}},
        "lazymar_token_cache": None,
        "lazymar_cond_cache": None,
        "recap": {"params": {"local_head_steps": {"int": [2, 4]}}},  # conflicts with both LazyMAR caches
    },
}


CHECKPOINT = []


@pytest.fixture(scope="module", autouse=True)
def tiny_checkpoint(tmp_path_factory):
    """Fixed random weights: every worker must load the same model (a study checks the weights' fingerprint)."""
    from safetensors.torch import save_file

    from conftest import make_tiny

    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in make_tiny(4).state_dict().items()}, str(path))
    CHECKPOINT[:] = [str(path)]
    yield path
    CHECKPOINT.clear()


def tune_args(out, space, *extra):
    return ["tune", "--model", "mar_tiny", "--checkpoint", CHECKPOINT[0], "--space", str(space), "--out", str(out),
            "--calibration-samples", "4",
            "--batch-size", "4", "--final-samples", "0", "--no-progress", "--threads", "1",
            "--baseline-set", "sampler.head_steps=4", *extra]  # a cheap baseline: 8 steps x 4 head steps


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE, sort_keys=False))  # plugin order is refine order
    return path


@pytest.fixture
def registry(monkeypatch):
    available_plugins()
    monkeypatch.setattr(plugin_mod, "_REGISTRY", dict(plugin_mod._REGISTRY))
    return plugin_mod._REGISTRY


def load_study(out):
    from marcache.tuning.study import creation_lock, default_storage

    url = default_storage(out)
    with creation_lock(url):  # a worker may be creating the schema right now
        name = optuna.get_all_study_names(url)[0]
        return optuna.load_study(study_name=name, storage=url)


def finished(study):
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


# ----------------------------------------------------------------------------- declarations
@dataclass
class _Cfg:
    beta: float = 0.1
    steps: int = 10
    mode: str = "a"

    def __post_init__(self):
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta={self.beta}: must be in (0, 1]")
        if self.mode not in ("a", "b"):
            raise ValueError(f"mode={self.mode!r}: 'a' or 'b'")


def _plugin(space):
    return type("Bad", (Plugin,), {"name": "tune_bad_test", "families": frozenset({"head"}), "Config": _Cfg, "search_space": space})


@pytest.mark.parametrize("space, message", [
    ({"beta": Float(0.0, 1.0)}, r"search_space\['beta'\] = float \[0, 1\]: beta=0.0 is refused by _Cfg \(beta=0.0: must be in \(0, 1\]\); fix the declared range"),
    ({"beta": Float(0.5, 0.1)}, r"low > high"),
    ({"steps": Int(0, 10, log=True)}, r"a log range needs low > 0"),
    ({"steps": Float(1.0, 4.0)}, r"the field is int, not float"),
    ({"mode": Categorical(("a", "c"))}, r"mode='c' is refused"),
    ({"stps": Int(1, 4)}, r"_Cfg has no field 'stps' \(did you mean 'steps'\?\)"),
    ({"steps": (1, 4)}, r"is not a marcache.search_space Int, Float or Categorical"),
])
def test_bad_declared_range_refused_at_registration(registry, space, message):
    with pytest.raises(PluginError, match=message) as info:
        register_plugin(_plugin(space))
    assert "\n" not in str(info.value) and "plugin 'tune_bad_test'" in str(info.value)
    assert "tune_bad_test" not in registry


def test_bad_declared_range_of_an_entry_point_plugin_is_one_line_exit_2(registry, monkeypatch, tmp_path, capsys):
    """A third-party plugin declares its space the same way; a bad range stops every command with one line."""
    (tmp_path / "badspace_plugin.py").write_text(
        "from dataclasses import dataclass\nfrom marcache.plugin import Plugin\nfrom marcache.search_space import Int\n"
        "@dataclass\nclass C:\n    n: int = 4\n    def __post_init__(self):\n        if self.n < 2:\n"
        "            raise ValueError(f'n={self.n}: must be >= 2')\n"
        "class P(Plugin):\n    name = 'badspace'\n    families = frozenset({'head'})\n    Config = C\n"
        "    search_space = {'n': Int(1, 8)}\n")
    fake_distribution(tmp_path, "badspace", {"marcache": {"badspace": "badspace_plugin:P"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin_mod, "_ENTRY_POINTS_LOADED", False)
    assert main(["plugins", "--tunable"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == ("marcache: error: plugin 'badspace': search_space['n'] = int [1, 8]: n=1 is refused by C "
                   "(n=1: must be >= 2); fix the declared range")
    sys.modules.pop("badspace_plugin", None)


def test_plugins_tunable_lists_declared_spaces(registry, monkeypatch, tmp_path, capsys):
    """Built-ins and a third-party plugin (the docs/plugins.md example, through an entry point)."""
    fake_distribution(tmp_path, "marcache-head-anneal", {"marcache": {"head_anneal": "marcache_head_anneal:HeadAnneal"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(plugin_mod, "_ENTRY_POINTS_LOADED", False)
    assert main(["plugins", "--tunable"]) == 0
    out = capsys.readouterr().out
    assert "fts (built-in)" not in out and "fts (marcache.plugins.fts)" in out
    assert "    beta: float [0.02, 0.5] log (default 0.1)" in out
    assert "gtr_order (marcache.plugins.gtr)\n    (no parameters: on/off only)" in out
    assert "warmup_steps: int [1, 16] (default 5, shared as 'lazymar.warmup_steps')" in out
    assert "head_anneal (marcache_head_anneal)\n    start: int [10, 100] log (default 50)" in out
    assert "random_order" not in out  # built-ins are not tunable
    sys.modules.pop("marcache_head_anneal", None)


# ----------------------------------------------------------------------------- the space file
def test_space_samples_valid_policies_with_shared_keys(tiny_model, space_file):
    """Shared keys give one value; requirements and declared conflicts are respected while sampling."""
    from marcache.tuning.space import load_space

    space = load_space(str(space_file), tiny_model)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        raw = space.suggest(trial)
        names = [p["name"] for p in raw["plugins"]]
        assert 2 <= raw["sampler"]["num_iter"] <= 4 and 2 <= raw["sampler"]["head_steps"] <= 4
        if {"lazymar_token_cache", "lazymar_cond_cache"} <= set(names):  # one sampled value for both caches
            tok, cond = (next(p["params"] for p in raw["plugins"] if p["name"] == n) for n in ("lazymar_token_cache", "lazymar_cond_cache"))
            assert tok == cond and set(tok) == {"warmup_steps", "refresh_interval"}
        assert "fts" not in names or "gtr_schedule" in names
        assert not ("recap" in names and {"lazymar_token_cache", "lazymar_cond_cache"} & set(names))
        resolve_policy(raw)  # every sampled combination is valid
        seen.update(names)
        study.tell(trial, [1.0, 0.0])
    assert seen == set(SPACE["plugins"])


@pytest.mark.parametrize("text, message", [
    ("plugins: {ftss: }", r"space.yaml: plugins.ftss: unknown plugin 'ftss'. Did you mean 'fts'\?"),
    ("plugins: {fts: {params: {beta: {float: [0, 2]}}}}", r"plugins.fts.params\['beta'\] = float \[0, 2\]: beta=0.0 is refused"),
    ("plugins: {fts: {params: {beta: {float: [0.1]}}}}", r"plugins.fts.params.beta: float needs \[low, high\]"),
    ("plugins: {lazymar_token_cache: {params: {warmup_steps: {int: [1, 4]}}}, lazymar_cond_cache: }",
     r"shared key 'lazymar.warmup_steps' has the range int \[1, 16\] here but int \[1, 4\] in lazymar_token_cache"),
    ("sampler: {num_iter: {int: [0, 4]}}", r"sampler\['num_iter'\] = int \[0, 4\]: num_iter=0 is refused"),
    ("sampler: {steps: 4}", r"sampler.steps: not a sampler setting"),
    ("plugins: {random_order: }", r"is a built-in and always present"),
    ("plugin: {}", r"a space file is a mapping with the keys sampler and plugins"),
])
def test_bad_space_file_is_one_line_exit_2(tmp_path, capsys, text, message):
    import re

    space = tmp_path / "space.yaml"
    space.write_text(text)
    out = tmp_path / "out"
    assert main(tune_args(out, space, "--n-trials", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
    assert not out.exists()  # refused before anything is written


# ----------------------------------------------------------------------------- runs
def test_tune_writes_front_and_a_policy_generate_accepts(tmp_path, space_file, capsys):
    out = tmp_path / "out"
    assert main(tune_args(out, space_file, "--n-trials", "6", "--target-flops-ratio", "1.5")) == 0
    study = load_study(out)
    assert len(finished(study)) == 6
    front = (out / "pareto.md").read_text()
    assert "| chosen |" in front and (out / "pareto.png").stat().st_size > 1000
    text = (out / "policy.yaml").read_text()
    data = json.loads((out / "trials.json").read_text())
    chosen = next(r for r in data["rows"] if f"trial {r['trial']} of 6" in text)
    assert chosen["flops_ratio"] >= 1.5
    assert f"# FLOPs ratio {chosen['flops_ratio']:.3f}x" in text and "quality drop" in text and "images/s" in text
    assert main(["policy", "validate", str(out / "policy.yaml")]) == 0
    gen = tmp_path / "gen"
    assert main(["generate", "--model", "mar_tiny", "--policy", str(out / "policy.yaml"), "--num-images", "2",
                 "--out", str(gen), "--no-progress"]) == 0


def test_invalid_combinations_are_pruned_not_crashed(tmp_path):
    """fts (reconstruction stage) without gtr_schedule is refused by the plugin: those trials are pruned."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"sampler": {"num_iter": 2, "head_steps": 2},
                                     "plugins": {"gtr_schedule": None, "fts": {"always": True, "params": {"detail_steps": 3}}}}))
    out = tmp_path / "out"
    assert main(tune_args(out, space, "--n-trials", "6")) == 0
    pruned = [t for t in load_study(out).trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all("needs the gtr_schedule plugin" in t.user_attrs["pruned"] for t in pruned)
    assert all(not t.params["use.gtr_schedule"] for t in pruned)


def test_unmet_budget_exits_2_with_the_closest_point(tmp_path, space_file, capsys):
    out = tmp_path / "out"
    assert main(tune_args(out, space_file, "--n-trials", "4", "--target-flops-ratio", "1000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("marcache: error: no trial meets --target-flops-ratio 1000 after 4 trials: the closest is trial ")
    study = load_study(out)
    best = max(t.user_attrs["flops_ratio"] for t in study.trials if "flops_ratio" in t.user_attrs)
    assert f"FLOPs ratio {best:.2f}x" in err
    assert (out / "pareto.md").exists() and not (out / "policy.yaml").exists()
    # a quality budget nobody meets (no point of this space reproduces the 8-step baseline exactly)
    assert main(tune_args(tmp_path / "out2", space_file, "--n-trials", "3", "--max-quality-drop", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no trial meets --max-quality-drop 0 after 3 trials" in err and ", quality drop 0." in err


def _spawn(out, space, n, log, *extra):
    cmd = [sys.executable, "-m", "marcache.cli", *tune_args(out, space, "--n-trials", str(n), *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_finished(out, count, proc, log, timeout=400):
    start = time.time()
    while time.time() - start < timeout:
        if (out / "study.db").exists():
            try:
                if len(finished(load_study(out))) >= count:
                    return
            except (IndexError, KeyError, optuna.exceptions.StorageInternalError):
                pass
        assert proc.poll() is None, f"the worker exited early: {Path(log.name).read_text()[-2000:]}"
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} trials after {timeout} s")


def test_kill_and_rerun_continues_the_study(tmp_path, space_file):
    out = tmp_path / "out"
    procs = []
    try:
        with open(tmp_path / "log1", "w") as log:
            # asks for more trials than it can finish before the kill (a fast machine finished a
            # 4-trial study between the poll and the signal), so the rerun always has work left
            procs.append(_spawn(out, space_file, 50, log))
            _wait_finished(out, 1, procs[0], log)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
        first = finished(load_study(out))
        before = {t.number: t.values for t in first if t.values}
        target = len(first) + 2
        baseline_file = next((out / "calibration").iterdir())
        stamp = baseline_file.stat().st_mtime_ns
        with open(tmp_path / "log2", "w") as log:
            procs.append(_spawn(out, space_file, target, log))
            assert procs[1].wait(timeout=400) == 0, (tmp_path / "log2").read_text()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    study = load_study(out)
    assert len(finished(study)) == target
    after = {t.number: t.values for t in finished(study) if t.values}
    assert all(after[n] == v for n, v in before.items())  # nothing measured twice
    assert baseline_file.stat().st_mtime_ns == stamp  # the baseline's calibration images were reused
    assert len({t.user_attrs.get("worker") for t in finished(study)}) == 2
    assert (out / "pareto.md").exists()


def test_two_workers_share_one_sqlite_storage(tmp_path, space_file):
    out = tmp_path / "out"
    logs = [open(tmp_path / f"log{i}", "w") for i in range(2)]
    procs = []
    try:
        # trials of ~0.3 s (32 calibration images) instead of 0.1 s, long beside the workers' start-up
        # skew, so one worker does not finish the whole study before the other begins
        procs = [_spawn(out, space_file, 6, log, "--calibration-samples", "32") for log in logs]
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"log{i}").read_text()[-2000:] for i in range(2)]
    study = load_study(out)
    done = finished(study)
    assert 6 <= len(done) <= 7  # each worker stops once the study has 6; they may overshoot by one
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both processes ran trials of the one study


def test_workers_opening_a_fresh_sqlite_study_wait_for_each_other(tmp_path):
    """Optuna's schema creation is not atomic: a second worker must not touch a fresh SQLite file
    while the first holds the creation lock (the race once failed CI with an IntegrityError)."""
    import fcntl
    import threading

    from marcache.tuning.study import default_storage, open_study

    url = default_storage(tmp_path)
    opened = []
    with open(url[len("sqlite:///"):] + ".lock", "a") as lock:  # the lock creation_lock takes
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: opened.append(open_study(url, "s", {"a": 1}, 0)))
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive() and not Path(url[len("sqlite:///"):]).exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert len(opened) == 1 and opened[0].user_attrs["settings"] == {"a": 1}
    again = open_study(url, "s", {"a": 1}, 0)  # a later worker loads the same study
    assert again._study_id == opened[0]._study_id


def test_new_methods_declared_spaces_tune_without_failures(tmp_path):
    """disa, halton_order and drift_refresh over their declared ranges: every trial finishes or is pruned
    for the one documented reason (drift_refresh needs lazymar_token_cache)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"sampler": {"num_iter": 4, "head_steps": 4},
                                     "plugins": {"disa": None, "halton_order": None, "lazymar_token_cache": None,
                                                 "drift_refresh": None}}))
    out = tmp_path / "out"
    assert main(tune_args(out, space, "--n-trials", "8")) == 0
    trials = load_study(out).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    for t in trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert "lazymar_token_cache" in t.user_attrs["pruned"] and not t.params["use.lazymar_token_cache"]
    assert any(t.params.get("use.disa") and t.state == optuna.trial.TrialState.COMPLETE for t in trials)
