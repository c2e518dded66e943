"""marcache: a faithful MAR sampler whose every decision is a plugin.

Public API::

    import marcache
    model = marcache.load_mar("mar_base", checkpoint="checkpoint-last.pth")   # model_ema by default
    images = marcache.generate(model, labels=[207, 360], policy="baseline", seed=0)
"""

from .errors import CheckpointError, ConfigError, MarcacheError, PluginError
from .loading import load_mar, load_vae
from .models import MAR, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "MAR",
    "create_model",
    "list_models",
    "load_mar",
    "load_vae",
    "MarcacheError",
    "CheckpointError",
    "ConfigError",
    "PluginError",
    "__version__",
]
