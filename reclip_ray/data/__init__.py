"""Datasets: Parquet shards of (key, image bytes, caption), the synthetic generator, ingest, tokenizer, Ray Data.

Submodules import their heavy dependencies (pyarrow, PIL, tokenizers, Ray) themselves; importing this package is cheap.
"""
