"""Ablations from sweep files: a trainer config, a grid or named variants, times seeds.

    python -m train.sweep configs/ablations/<name>.yaml [--jobs N] [--report docs/results/<name>.md]
    python -m train.sweep configs/ablations/<name>.yaml --tiny          # any sweep at seconds per run
    python -m train.sweep configs/ablations/<name>.yaml --collect       # tables and plots only
    python -m train.sweep.verdicts                                      # docs/results/README.md

`spec` reads sweep files and overlays, `runner` runs them, `columns` declares the result
columns once, `stats` judges claims by paired confidence intervals over seeds, `report` writes
a sweep's page and `verdicts` the page of every claim.
"""
