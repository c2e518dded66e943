"""Matched fewer-steps baselines: the plain sampler's FLOPs on a grid of (AR steps, head steps)."""

from __future__ import annotations

from typing import Optional

from marcache.plans import HEAD_STEPS_MIN


class StepGrid:
    """FLOPs per image of the plain sampler at ``num_iter = n`` and ``head_steps = h``, from shape-only
    runs: ``F(n, h) = T(n) + h * H`` (T: encoder + decoder at n steps; H: head FLOPs per head step,
    exact because the official head is linear in its step count)."""

    def __init__(self, model, baseline_overrides: list[str]):
        self.model = model
        self.overrides = list(baseline_overrides)
        self._t: dict[int, float] = {}
        self.head_per_step: Optional[float] = None

    def _flops(self, n: int) -> float:
        from marcache.flops import policy_flops
        from marcache.policy import load_policy

        if n not in self._t:
            s = policy_flops(self.model, load_policy("baseline", self.overrides + [f"sampler.num_iter={n}", f"sampler.head_steps={HEAD_STEPS_MIN}"]))
            comps = s["components"]
            self._t[n] = (comps["encoder"]["flops"] + comps["decoder"]["flops"]) / s["images"] / 1e12
            if self.head_per_step is None:
                self.head_per_step = comps["head"]["flops"] / s["images"] / 1e12 / HEAD_STEPS_MIN
        return self._t[n]

    def tflops(self, n: int, h: int) -> float:
        t = self._flops(n)
        return t + h * self.head_per_step

    def match_ar(self, target: float, n0: int, h: int) -> tuple[int, float]:
        """The num_iter in [1, n0] (head steps ``h``) whose FLOPs are closest to ``target``."""
        best = min(range(1, n0 + 1), key=lambda n: (abs(self.tflops(n, h) - target), -n))
        return best, self.tflops(best, h)

    def match_mixed(self, target: float, n0: int, h0: int) -> tuple[int, int, float]:
        """AR and head steps reduced in proportion (``h = h0 * n / n0``), closest to ``target``."""
        def setting(n):
            return n, min(max(round(h0 * n / n0), HEAD_STEPS_MIN), h0)

        best = min(range(1, n0 + 1), key=lambda n: (abs(self.tflops(*setting(n)) - target), -n))
        n, h = setting(best)
        return n, h, self.tflops(n, h)

    def match_head(self, target: float, n: int, h0: int) -> tuple[int, float]:
        """The head-step count in [HEAD_STEPS_MIN, h0] (num_iter ``n``) whose FLOPs are closest to ``target``."""
        self._flops(n)
        h = round((target - self._t[n]) / self.head_per_step)
        h = min(max(h, HEAD_STEPS_MIN), h0)
        return h, self.tflops(n, h)
