"""Built-in accounting: every run report carries the FLOPs of what actually executed.

Adds a ``flops`` section to the report (``report["engagement"]["flops"]``): totals and per image,
per component (encoder, decoder, head; VAE decode separately), by operator, with the convention
(FLOPs = 2 x multiply-adds). Costs per execution shape come from fvcore (see :mod:`marcache.flops`);
pricing happens when the report is built, outside the timed generation. Drop it with
``disable: [flop_counter]``.
"""

from marcache.flops import FlopObserver
from marcache.plugin import register_plugin


@register_plugin
class FlopCounter(FlopObserver):
    name = "flop_counter"
    families = frozenset({"accounting"})
    builtin = True
    section = "flops"
    description = "FLOPs of the executed plans per component in the report (2 x MAC, fvcore per-shape costs)"
