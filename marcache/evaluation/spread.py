"""Seed spread of quality metrics, and the verdict of a comparison that respects it.

One FID number says little: two seeds of the same policy differ by about 2 % at N = 5000 on mar_mnist.
:func:`combine_seeds` merges the results of several seeds (mean, per-seed values, spread = max - min);
:func:`judge` calls a difference smaller than the spread a tie.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: metrics averaged over seeds, with whether higher is better
METRICS = {"fid": False, "kid": False, "precision": True, "recall": True, "f_score": True,
           "inception_score": True, "class_accuracy": True}


def _numbers(values):
    return [v for v in values if isinstance(v, (int, float))]


def parse_seeds(text: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``: distinct integers, at least ``minimum``; else one ConfigError line naming ``option``."""
    from ..errors import ConfigError

    try:
        seeds = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        seeds = ()
    if len(seeds) < minimum or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{option} {text!r}: give {'two' if minimum == 2 else 'one'} or more distinct integers, "
                          f"e.g. {option} 0,1")
    return seeds


def merge(per_seed: Sequence[dict]) -> dict:
    """``{metric: mean, metric_per_seed: [...], metric_spread: max - min}`` for every metric present."""
    out = {}
    for key in METRICS:
        values = [r.get(key) for r in per_seed]
        if not _numbers(values) or len(_numbers(values)) != len(values):
            continue
        out[key] = sum(values) / len(values)
        out[f"{key}_per_seed"] = values
        out[f"{key}_spread"] = max(values) - min(values)
    return out


def judge(value: float, reference: float, spread: Optional[float], higher_is_better: bool = False) -> Optional[str]:
    """``"tie"`` when ``|value - reference| <= spread``, else ``"better"``/``"worse"``; None without a spread."""
    if spread is None:
        return None
    diff = value - reference
    if abs(diff) <= spread:
        return "tie"
    return "better" if (diff > 0) == higher_is_better else "worse"


def compare(result: dict, reference: dict, metric: str) -> Optional[dict]:
    """``metric`` of ``result`` against ``reference``: ``{"<metric>_difference", "spread", "verdict"}``, judged
    against the larger of the two seed spreads (``<metric>_spread``; verdict None when either has none).
    None when either result lacks the metric."""
    if result.get(metric) is None or reference.get(metric) is None:
        return None
    spreads = [r.get(f"{metric}_spread") for r in (result, reference)]
    spread = None if None in spreads else max(spreads)
    return {f"{metric}_difference": result[metric] - reference[metric], "spread": spread,
            "verdict": judge(result[metric], reference[metric], spread, METRICS[metric])}


def combine_seeds(results: Sequence[dict]) -> dict:
    """One result from per-seed results of ``evaluate`` (same policy, N, settings; different seeds).

    Speed fields are averaged too. With ``--against``, ``against_metrics`` is merged the same way and
    ``comparison`` holds the FID difference to the reference policy, the spread it is judged against
    (the larger of the two policies' seed spreads) and the verdict (tie / better / worse);
    ``recall_comparison`` the same for recall (higher is better).
    """
    combined = dict(results[0])
    combined.pop("fidelity", None)
    combined.update(seed=None, seeds=[r.get("seed") for r in results])
    combined.update(merge(results))
    for key in ("images_per_second", "generation_seconds", "wall_seconds"):
        values = [r.get(key) for r in results]
        if _numbers(values) and len(_numbers(values)) == len(values):
            combined[key] = sum(values) / len(values)
    if all("fidelity" in r for r in results):
        combined["fidelity_per_seed"] = [r["fidelity"] for r in results]
    if all(r.get("against_metrics") for r in results):
        against = merge([r["against_metrics"] for r in results])
        combined["against_metrics"] = against
        # FID can tie while diversity drops, so recall gets its own verdict ("recall_comparison")
        for metric, name in (("fid", "comparison"), ("recall", "recall_comparison")):
            comparison = compare(combined, against, metric)
            if comparison:
                combined[name] = comparison
    return combined
