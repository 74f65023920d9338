"""Layers: the toy LM, the MoE layer, LoRA, translators, upcycling.

Imported as `models` (the old spelling, in the checkout), it is the package `moe_playground.models`; see moe_playground/__init__.py."""

if __name__ == "models":
    from moe_playground import alias_old_spelling

    alias_old_spelling(__name__)
