"""Plugin-side helpers of the feature-caching plugins (LazyMAR, ReCAP, ...).

The model's partial pass (:mod:`marcache.models.partial`) knows only a :class:`FeatureCache`; where
that cache lives during a generation (the :class:`~marcache.state.CacheStore`, shared by every plugin
that refines the same forward plan) and which positions an incremental step recomputes are the
plugins' business, kept here.
"""

from __future__ import annotations

from typing import Optional

import torch

from marcache.models.mar import mask_positions
from marcache.models.partial import FeatureCache

#: CacheStore namespace and key of the generation's shared feature cache
STORE_NAMESPACE, STORE_KEY = "features", "cache"


def shared_feature_cache(store, dtype: torch.dtype = torch.float32) -> FeatureCache:
    """The generation's feature cache (one per batch, shared by the plugins that refine a plan)."""
    cache = store.get(STORE_NAMESPACE, STORE_KEY)
    if cache is None:
        cache = FeatureCache(dtype=dtype)
        store.put(STORE_NAMESPACE, STORE_KEY, cache)
    return cache


def buffer_and_new_tokens(step) -> torch.Tensor:
    """Encoder queries of an incremental pass: the buffer + the tokens decoded at the previous step,
    ``[B, buffer + n_prev]`` positions (LazyMAR's lazy steps, ReCAP's Local-FEs)."""
    buf, b = step.gen.model.buffer_size, step.gen.batch_size
    buffer = torch.arange(buf, device=step.mask.device).expand(b, -1)
    prev = mask_positions(step.prev_mask_to_pred, step.tokens_prev_step) + buf
    return torch.cat([buffer, prev], dim=1)


def feature_cache_of(store) -> Optional[FeatureCache]:
    """The generation's feature cache if a plugin created one (for observers and tests)."""
    return store.get(STORE_NAMESPACE, STORE_KEY)
