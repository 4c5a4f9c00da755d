"""Effectiveness benchmark: BAERASE against baseline defenses on backdoored and clean models.

    python -m benchmarks.effectiveness                 # small grid, a few minutes on 2 cores
    python -m benchmarks.effectiveness --grid full     # the issue's grid with ablations (hours)
    python -m benchmarks.effectiveness --data PATH     # the same on a user's data set
    python -m benchmarks.effectiveness.reach colour10/sig_clean/0 colour10/clean/0   # per-class universal signals

Per cell (data, model, attack, poison rate, defender budget, seed) it trains the model, then runs
every defense on the same clean hold-out images and reports clean accuracy and attack success
before/after, flagged classes, false flags and wall time, in ``benchmarks/results/effectiveness*``
(markdown, JSON and a PNG plot).
"""
