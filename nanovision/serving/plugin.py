"""vLLM plugin: serve nanovision checkpoints with no extra flag.

setup.cfg registers `register` under the `vllm.general_plugins` entry point, so vLLM calls it in every process it
starts (front end, engine core, workers). It maps nanovision's architectures onto vLLM's Transformers modeling
backend, the way vLLM's own registry maps the Transformers models it serves through that backend: the backend builds
our `AutoModel` (importing nanovision registers it, so no remote code is needed) and swaps in vLLM's paged attention
through transformers' attention interface, and its parallel linears and embedding. It also registers the
"nanovision" tokenizer mode, whose renderer refuses a text-only prompt holding `<image>` placeholders (renderer.py).

Without nanovision installed, `vllm serve CKPT --trust-remote-code` reaches the same backend through the checkpoint's
remote code (config.json's auto_map names the base models), with vLLM's unmodified classes: its own multimodal
processor, and on vLLM 0.26 no logit soft cap.
"""

import logging

# config.json "architectures" -> vLLM Transformers-backend class, as lazy "module:Class" strings: registering imports
# nothing heavy (and never initialises CUDA in the parent process). Both are vLLM's own classes rebuilt to apply the
# logit soft cap on every vLLM version; the VLM's also gets a multimodal processor that answers a placeholder/image
# count mismatch with a ValueError (see vllm_models.py).
ARCHITECTURES = {
    "NanoVisionForCausalLM": "nanovision.serving.vllm_models:TransformersForCausalLM",
    "NanoVisionForConditionalGeneration": "nanovision.serving.vllm_models:TransformersMultiModalForCausalLM",
}

# Tokenizer mode (vLLM picks the tokenizer and the renderer by it) -> vLLM's HF tokenizer and nanovision's renderer.
TOKENIZER_MODE = "nanovision"


def register_renderer() -> bool:
    """Registers the "nanovision" tokenizer mode; False on a vLLM without tokenizer and renderer registries (or
    without the renderer hooks renderer.py overrides), where the mode is not there to choose."""
    try:
        from vllm.renderers.base import BaseRenderer
        from vllm.renderers.registry import RENDERER_REGISTRY
        from vllm.tokenizers.registry import TokenizerRegistry
    except ImportError:
        return False
    if not all(hasattr(BaseRenderer, name) for name in ("process_for_engine", "process_for_engine_async")):
        return False
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:  # registering again would log an "overwritten" warning
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "nanovision.serving.renderer", "NanoVisionRenderer")
    return True


class DowncastWarningFilter(logging.Filter):
    """Drops vLLM's per-weight "Attempted to load weight ... with dtype torch.float32 into parameter with dtype
    torch.bfloat16" warnings: serving an fp32 checkpoint in bf16/fp16 casts every weight, which vLLM already
    announces once ("Downcasting torch.float32 to torch.bfloat16"); a 56-line echo of it buries real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg.startswith("Attempted to load weight") and len(record.args) >= 3
                    and str(record.args[1]) == "torch.float32"
                    and str(record.args[2]) in ("torch.bfloat16", "torch.float16"))


def register():
    from vllm import ModelRegistry

    import nanovision  # noqa: F401  registers the configs, models and processor with transformers' Auto classes

    weights_logger = logging.getLogger("vllm.model_executor.models.utils")
    if not any(isinstance(f, DowncastWarningFilter) for f in weights_logger.filters):
        weights_logger.addFilter(DowncastWarningFilter())
    supported = set(ModelRegistry.get_supported_archs())
    for architecture, model_cls in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, model_cls)
    register_renderer()
