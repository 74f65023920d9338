"""Memory layers: sparse feed-forward blocks that read a large table of keys and values.

    product_key.py   ProductKeyMemory (Lample et al. 2019; Memory+ of Berges et al. 2024): trained table
    ema_slot.py      EMASlotMemory: slots written without gradient by an exponential moving average
    shared.py        what both use: the Memory+ gated output, read tracking for usage metrics
"""
