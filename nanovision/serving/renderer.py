"""The "nanovision" renderer: vLLM's HF renderer plus the placeholder check for prompts that carry no image.

vLLM runs no multimodal processing for a prompt without multimodal data, so `NanoVisionMultiModalProcessor` never
sees one: the engine would embed its `<image>` placeholders as ordinary tokens, where HF's processor and generation
class refuse them. The check cannot go into the model either: its forward stays lenient, since vLLM's Transformers
backend runs it on text-only batches and an error inside the engine stops the engine for every request. The renderer
runs in the front end (the API server process, or the process of `vllm.LLM`), on the final prompt ids of every
request (completion text, token ids, rendered chat), before the request reaches the engine; its ValueError is the
OpenAI server's HTTP 400.

vLLM picks a renderer by tokenizer mode: the plugin registers "nanovision" (vLLM's HF tokenizer with this renderer),
which `nanovision serve` and `create_vllm_engine` choose unless told another (`vllm serve CKPT --tokenizer-mode
nanovision` for vLLM's own command). Imported lazily by vLLM, in the front end only.
"""

from vllm.renderers.hf import HfRenderer

from .vllm_models import NanoVisionMultiModalProcessor, check_placeholders


class NanoVisionRenderer(HfRenderer):
    def check_text_only(self, engine_input):
        # "token": no multimodal data. A prompt with images comes back "multimodal", checked by the multimodal
        # processor already; text models (no processor) and other vision-language models are left as vLLM has them.
        if engine_input.get("type") == "token" and isinstance(self.mm_processor, NanoVisionMultiModalProcessor):
            check_placeholders(self.mm_processor.info, engine_input["prompt_token_ids"], num_images=0)
        return engine_input

    def process_for_engine(self, prompt, arrival_time, **kwargs):  # vllm.LLM's generate and chat
        return self.check_text_only(super().process_for_engine(prompt, arrival_time, **kwargs))

    async def process_for_engine_async(self, prompt, arrival_time, **kwargs):  # the OpenAI server
        return self.check_text_only(await super().process_for_engine_async(prompt, arrival_time, **kwargs))


__all__ = ["NanoVisionRenderer"]
