"""Strict JSON for reports: Python's ``json`` writes ``Infinity``/``NaN``, which JSON parsers refuse."""

from __future__ import annotations

import math


def json_safe(value):
    """A copy of ``value`` with non-finite floats replaced: ``inf`` -> ``"inf"`` (e.g. the PSNR of identical
    images), ``-inf`` -> ``"-inf"``, NaN -> ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
