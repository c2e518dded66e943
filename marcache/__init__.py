"""marcache: a faithful MAR sampler whose every decision is a plugin.

Public API::

    import marcache
    model = marcache.load_mar("mar_base", checkpoint="checkpoint-last.pth")   # model_ema by default
    sampler = marcache.Sampler(model, policy="lazymar")        # a shipped policy name or a YAML path
    result = sampler.generate(labels=[207, 360], seed=0)       # result.tokens [2, L, C], result.report
    images = marcache.tokens_to_images(model, result.tokens, vae=marcache.load_vae("kl16.ckpt"))

``marcache.testing`` holds the tiny model, the step recorder and the scheduling invariants for the
tests of third-party plugins.
"""

from .errors import CheckpointError, ConfigError, MarcacheError, PluginError
from .loading import load_mar, load_vae
from .images import tokens_to_images
from .models import MAR, create_model, list_models
from .policy import load_policy
from .scheduler import GenerationResult, Sampler, generate_tokens

__version__ = "0.1.0"

__all__ = [
    "MAR",
    "create_model",
    "list_models",
    "load_mar",
    "load_vae",
    "load_policy",
    "Sampler",
    "GenerationResult",
    "generate_tokens",
    "tokens_to_images",
    "MarcacheError",
    "CheckpointError",
    "ConfigError",
    "PluginError",
    "__version__",
]
