"""Serving nanovision checkpoints with vLLM: the vLLM plugin, an engine with batch / chat generation and the
`nanovision infer` / `nanovision serve` commands. vLLM is imported lazily: nanovision imports without it."""

from .engine import NanoVisionEngine, create_vllm_engine, load_image

__all__ = ["NanoVisionEngine", "create_vllm_engine", "load_image"]
