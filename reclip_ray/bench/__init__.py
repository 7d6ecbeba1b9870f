"""Benchmarks run by ``reclip-ray bench data|model|e2e``; each prints JSON lines."""
