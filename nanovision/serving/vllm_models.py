"""The vLLM model classes the plugin registers for nanovision's architectures.

Each is vLLM's own Transformers-backend class, built from the same bases under the same name (so vLLM still treats it
as the Transformers backend), with two changes:

- the logits get the text config's `final_logit_softcapping`. vLLM 0.32's `CausalMixin` gives it to its logits
  processor; 0.26's leaves it out, so sampling and logprobs would see uncapped logits (greedy tokens are the same).
- the vision-language class's multimodal processor rejects a prompt whose `<image>` placeholders do not match its
  images with a ValueError, which the OpenAI server answers with HTTP 400. vLLM 0.32's cached processing path
  otherwise trips an assertion on a prompt with more images than placeholders (HTTP 500). A prompt without
  multimodal data never reaches it: renderer.py checks those.

Imported lazily by vLLM (never by `import nanovision`).
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


def check_placeholders(info, prompt, num_images: int) -> None:
    """A ValueError unless the prompt (text or ids) holds one `<image>` placeholder per image, as the checkpoint's
    processor (`info.get_hf_processor()`) names the placeholder."""
    processor = info.get_hf_processor()
    image_token = getattr(processor, "image_token", "<image>")
    found = count_placeholders(prompt, image_token, getattr(processor, "image_token_id", None))
    if found == num_images:
        return
    if not num_images:
        raise ValueError(f"The prompt holds {found} '{image_token}' placeholder(s) but no image was given: attach "
                         "one image per placeholder or remove the placeholder.")
    raise ValueError(f"The prompt holds {found} '{image_token}' placeholder(s) but {num_images} image(s) were given: "
                     "pass one image per placeholder (the chat template writes one per image part).")


class NanoVisionMultiModalProcessor(MultiModalProcessor):
    def apply(self, inputs, *args, **kwargs):
        # Also with no image (multi_modal_data {"image": []}): vLLM would run the placeholders as plain tokens.
        check_placeholders(self.info, inputs.prompt, inputs.mm_data_items.get_count("image", strict=False))
        return super().apply(inputs, *args, **kwargs)


class LogitSoftcapMixin:
    """Sets the logits processor's soft cap from the text config where vLLM's `CausalMixin` did not (0.26)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        logits_processor = getattr(self, "logits_processor", None)  # none on a pipeline stage without the head
        if logits_processor is not None and logits_processor.soft_cap is None:
            logits_processor.soft_cap = getattr(self.text_config, "final_logit_softcapping", None)


# Same bases and names as vLLM's classes (plus the mixin, which `get_language_model` leaves out as it is not in
# vllm.model_executor.models.transformers): `ModelConfig.using_transformers_backend` keeps working.
class TransformersForCausalLM(LogitSoftcapMixin, *backend.TransformersForCausalLM.__bases__):
    """vLLM's Transformers-backend text class with the logit soft cap."""


@MULTIMODAL_REGISTRY.register_processor(
    NanoVisionMultiModalProcessor, info=MultiModalProcessingInfo, dummy_inputs=MultiModalDummyInputsBuilder
)
class TransformersMultiModalForCausalLM(LogitSoftcapMixin, *backend.TransformersMultiModalForCausalLM.__bases__):
    """vLLM's Transformers-backend multimodal class with the logit soft cap and `NanoVisionMultiModalProcessor`."""

__all__ = ["TransformersForCausalLM", "TransformersMultiModalForCausalLM", "NanoVisionMultiModalProcessor",
           "check_placeholders", "count_placeholders"]
