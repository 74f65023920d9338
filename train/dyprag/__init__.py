"""DyPRAG / PRAG doc-to-LoRA pipeline: `python -m train.dyprag <config>` (see pipeline.py)."""
