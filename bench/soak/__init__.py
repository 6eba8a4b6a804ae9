"""The soak bench's modules (entry point: bench/soak.py).

runner.py runs in each engine's process and inject.py (via site/sitecustomize.py) inside
vLLM's EngineCore; the rest runs in the bench's own process.
"""
