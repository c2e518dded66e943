"""The Optuna study of ``marcache tune``: storage, sampler, objective, budgets; resumable and shareable.

The study lives in an Optuna RDB storage (SQLite under ``--out`` by default, any SQLAlchemy URL for
workers on several machines). Its settings (model weights, calibration set, quality metric, cost
objective, space) are stored with it, so rerunning the same command continues the study and a worker
with different settings is refused with one line. ``--n-trials`` is the number of finished trials the
study should reach, counted over every worker. Heartbeats let a later worker fail and retry a trial
whose process was killed.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, MarcacheError

#: objectives: cost ratio (FLOPs baseline/policy or measured speedup; higher is better) and quality drop
DIRECTIONS = ["maximize", "minimize"]


@dataclass
class Budget:
    """At most one of: a FLOPs-ratio floor, a speedup floor, a quality-drop ceiling."""

    target_flops_ratio: Optional[float] = None
    target_speedup: Optional[float] = None
    max_quality_drop: Optional[float] = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def violation(self, attrs: dict) -> Optional[float]:
        """> 0: by how much a trial misses the budget (None: not measured, e.g. pruned before generation)."""
        if self.target_flops_ratio is not None:
            return None if attrs.get("flops_ratio") is None else self.target_flops_ratio - attrs["flops_ratio"]
        if self.target_speedup is not None:
            return None if attrs.get("speedup") is None else self.target_speedup - attrs["speedup"]
        if self.max_quality_drop is not None:
            return None if attrs.get("quality_drop") is None else attrs["quality_drop"] - self.max_quality_drop
        return 0.0

    def describe(self) -> str:
        if self.target_flops_ratio is not None:
            return f"--target-flops-ratio {self.target_flops_ratio:g}"
        if self.target_speedup is not None:
            return f"--target-speedup {self.target_speedup:g}"
        if self.max_quality_drop is not None:
            return f"--max-quality-drop {self.max_quality_drop:g}"
        return "no budget"


def storage_for(url: str):
    """An RDB storage with heartbeats (a killed worker's trial is failed, then retried by a later one)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the file lock
    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=30,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
        except SQLAlchemyError as exc:  # e.g. two workers on a fresh remote database racing on its schema
            if attempt == 2:
                raise ConfigError(f"--storage {url}: cannot open ({str(exc).splitlines()[0]})") from None
            time.sleep(1.0 + attempt)
        except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
            raise ConfigError(f"--storage {url}: cannot open ({str(exc).splitlines()[0]})") from None


@contextmanager
def creation_lock(url: str):
    """Serialize workers opening one local SQLite study: creating its schema is not atomic in Optuna
    (two fresh workers both insert the alembic version row and one fails). Readers of a study that a
    worker may be creating (a monitor, a test) take it too."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on storage_for's retries
        fcntl = None
    if not path or path == ":memory:" or fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_study(storage_url: str, study_name: str, settings: dict, seed: int):
    """Create or load the study; refuse one made with other settings; a fresh TPE sampler per worker."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with creation_lock(storage_url):
        storage = storage_for(storage_url)
        study = optuna.create_study(storage=storage, study_name=study_name, directions=DIRECTIONS,
                                    load_if_exists=True)
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", settings)
    if stored is not None and stored != settings:
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        raise ConfigError(f"study {study_name!r} in {storage_url} was made with other settings ({', '.join(diff)}); "
                          f"rerun with the same arguments, or pass another --study-name / --out")
    # the seed moves with the study's length: a resumed run or a second worker does not replay the
    # first one's random start-up trials
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + 7919 * len(study.trials), multivariate=True, group=True, n_startup_trials=8)
    return study


def finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def make_objective(space, calibration, budget: Budget, cost: str):
    """The trial function: sample, validate (prune invalid combinations), price, measure."""
    import optuna
    from optuna.trial import TrialState

    from ..policy import resolve_policy
    from .objective import tflops
    from .report import label

    def constrain(trial):
        """The budget as Optuna's soft constraint (<= 0: feasible), which steers TPE to the feasible region."""
        violation = budget.violation(trial.user_attrs)
        trial.set_user_attr("violation", violation)
        if budget.active:
            trial.set_constraint("budget", violation)

    def objective(trial):
        raw = space.suggest(trial)
        trial.set_user_attr("label", label(raw))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        twin = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.params == trial.params), None)
        if twin is not None:  # TPE repeats integer points: reuse the measurement
            for key, value in twin.user_attrs.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("same_as", twin.number)
            return twin.values
        try:
            policy = resolve_policy(raw, source=f"trial {trial.number}")
            tf = tflops(calibration.model_name, policy)
        except MarcacheError as exc:  # a combination the plugins refuse (conflict, dependency, range)
            trial.set_user_attr("pruned", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        ratio = calibration.baseline_tflops / tf
        trial.set_user_attr("policy", policy.to_dict())
        trial.set_user_attr("tflops_per_image", tf)
        trial.set_user_attr("flops_ratio", ratio)
        if budget.target_flops_ratio is not None and ratio < budget.target_flops_ratio:
            # exact before any image is generated: no need to measure a point that cannot meet the budget
            constrain(trial)
            trial.set_user_attr("pruned", f"FLOPs ratio {ratio:.2f}x below {budget.describe()}")
            raise optuna.TrialPruned("below the FLOPs budget")
        measured = calibration.measure(policy)
        for key, value in measured.items():
            trial.set_user_attr(key, value)
        constrain(trial)
        return (ratio if cost == "flops" else measured["speedup"]), measured["quality_drop"]

    return objective


def run_study(study, objective, n_trials: int, describe_best, progress: bool = True) -> None:
    """Run trials until the study (all workers together) has ``n_trials`` finished ones."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from tqdm import tqdm

    done = len(finished(study))
    if done >= n_trials:
        return
    bar = tqdm(total=n_trials, initial=done, desc="tune", unit="trial", disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(describe_best(study))

    def update(study, trial):
        bar.n = min(n_trials, len(finished(study)))
        bar.set_postfix_str(describe_best(study))
        bar.refresh()

    stop = MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    try:
        study.optimize(objective, n_trials=None, callbacks=[update, stop], gc_after_trial=False)
    finally:
        bar.close()


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"
