"""``marcache tune``: search composed policies for a budget on the user's own model (Optuna, resumable).

- :mod:`.space`: the search space (declared by plugins, narrowed by a space file);
- :mod:`.objective`: the calibration set, fidelity to the baseline, exact FLOPs, measured speed;
- :mod:`.study`: the Optuna study (RDB storage, heartbeats, budgets as constraints, several workers);
- :mod:`.report`: the Pareto front (table, plot), the chosen policy YAML, the final FID check;
- :mod:`.cli`: the command.
"""
