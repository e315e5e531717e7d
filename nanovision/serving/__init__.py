"""Serving nanovision checkpoints with vLLM: the vLLM plugin, an engine with batch / chat generation, throughput
helpers and the `nanovision infer` command. vLLM is imported lazily: nanovision imports without it."""

from .engine import NanoVisionEngine, benchmark_throughput, compare_backends, create_vllm_engine, load_image

__all__ = ["NanoVisionEngine", "create_vllm_engine", "benchmark_throughput", "compare_backends", "load_image"]
