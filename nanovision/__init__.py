"""nanovision: a nanochat-style vision-language model as a transformers plugin.

Importing the package registers its configs, models and processors with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from . import presets
from .configuration_nanovision import NanoVisionConfig, NanoVisionTextConfig
from .modeling_nanovision import (
    NanoVisionForCausalLM,
    NanoVisionForConditionalGeneration,
    NanoVisionModel,
    NanoVisionTextModel,
)
from .processing_nanovision import NanoVisionImageProcessor, NanoVisionProcessor

__version__ = "0.1.0"

AutoConfig.register(NanoVisionTextConfig.model_type, NanoVisionTextConfig)
AutoConfig.register(NanoVisionConfig.model_type, NanoVisionConfig)
AutoModel.register(NanoVisionTextConfig, NanoVisionTextModel)
AutoModelForCausalLM.register(NanoVisionTextConfig, NanoVisionForCausalLM)
AutoModel.register(NanoVisionConfig, NanoVisionModel)
AutoModelForImageTextToText.register(NanoVisionConfig, NanoVisionForConditionalGeneration)
AutoImageProcessor.register(NanoVisionConfig, image_processor_classes={"pil": NanoVisionImageProcessor})
AutoProcessor.register(NanoVisionConfig, NanoVisionProcessor)
# save_pretrained then writes the modeling files next to the weights: the folder loads with trust_remote_code=True
# where nanovision is not installed.
NanoVisionTextConfig.register_for_auto_class()
NanoVisionTextModel.register_for_auto_class("AutoModel")
NanoVisionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
NanoVisionConfig.register_for_auto_class()
NanoVisionModel.register_for_auto_class("AutoModel")
NanoVisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
NanoVisionImageProcessor.register_for_auto_class("AutoImageProcessor")
NanoVisionProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "NanoVisionConfig",
    "NanoVisionTextConfig",
    "NanoVisionTextModel",
    "NanoVisionForCausalLM",
    "NanoVisionModel",
    "NanoVisionForConditionalGeneration",
    "NanoVisionImageProcessor",
    "NanoVisionProcessor",
    "presets",
]
