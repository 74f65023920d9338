"""Speed comparisons, side by side in one run.

Imported as `benchmarks` (the old spelling, in the checkout), it is the package `moe_playground.benchmarks`; see moe_playground/__init__.py."""

if __name__ == "benchmarks":
    from moe_playground import alias_old_spelling

    alias_old_spelling(__name__)
