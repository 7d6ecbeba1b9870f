"""Benchmarks run by ``reclip-ray bench data|model|e2e|step``; each prints JSON lines."""
