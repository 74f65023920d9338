"""Training, sweeps, analysis, export, sampling.

Imported as `train` (the old spelling, in the checkout), it is the package `moe_playground.train`; see moe_playground/__init__.py."""

if __name__ == "train":
    from moe_playground import alias_old_spelling

    alias_old_spelling(__name__)
