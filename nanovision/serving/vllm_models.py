"""The vLLM model class the plugin registers for nanovision's vision-language architecture.

It is vLLM's own Transformers-backend multimodal class, built from the same bases under the same name (so vLLM
still treats it as the Transformers backend), with one change: its multimodal processor rejects a prompt whose
`<image>` placeholders do not match its images with a ValueError, which the OpenAI server answers with HTTP 400.
vLLM 0.32's cached processing path otherwise trips an assertion on a prompt with more images than placeholders
(HTTP 500). Imported lazily by vLLM (never by `import nanovision`).
"""

from vllm.model_executor.models import transformers as backend
from vllm.model_executor.models.transformers.multimodal import (
    MultiModalDummyInputsBuilder,
    MultiModalProcessingInfo,
    MultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY


def count_placeholders(prompt, image_token: str, image_token_id: int) -> int:
    """`<image>` placeholders in a prompt given as text or as token ids (vLLM 0.32 passes ids, 0.26 either)."""
    if isinstance(prompt, str):
        return prompt.count(image_token)
    return sum(1 for token in prompt if token == image_token_id)


class NanoVisionMultiModalProcessor(MultiModalProcessor):
    def apply(self, inputs, *args, **kwargs):
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if num_images:
            processor = self.info.get_hf_processor()
            image_token = getattr(processor, "image_token", "<image>")
            image_token_id = getattr(processor, "image_token_id", None)
            found = count_placeholders(inputs.prompt, image_token, image_token_id)
            if found != num_images:
                raise ValueError(
                    f"The prompt holds {found} '{image_token}' placeholder(s) but {num_images} image(s) were "
                    "given: pass one image per placeholder (the chat template writes one per image part)."
                )
        return super().apply(inputs, *args, **kwargs)


_Backend = backend.TransformersMultiModalForCausalLM

# Same bases and name as vLLM's class: `get_language_model` and `ModelConfig.using_transformers_backend` keep working.
@MULTIMODAL_REGISTRY.register_processor(
    NanoVisionMultiModalProcessor, info=MultiModalProcessingInfo, dummy_inputs=MultiModalDummyInputsBuilder
)
class TransformersMultiModalForCausalLM(*_Backend.__bases__):
    """vLLM's Transformers-backend multimodal class with `NanoVisionMultiModalProcessor`."""

__all__ = ["TransformersMultiModalForCausalLM", "NanoVisionMultiModalProcessor", "count_placeholders"]
