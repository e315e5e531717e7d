"""nanovision: a nanochat-style vision-language model as a transformers plugin.

Importing the package registers its configs, models and processors with transformers' Auto classes.
"""

import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from . import presets
from .configuration_nanovision import NanoVisionConfig, NanoVisionTextConfig
from .modeling_nanovision import (
    NanoVisionForCausalLM,
    NanoVisionForConditionalGeneration,
    NanoVisionModel,
    NanoVisionTextModel,
)

__version__ = "0.1.0"

AutoConfig.register(NanoVisionTextConfig.model_type, NanoVisionTextConfig)
AutoConfig.register(NanoVisionConfig.model_type, NanoVisionConfig)
AutoModel.register(NanoVisionTextConfig, NanoVisionTextModel)
AutoModelForCausalLM.register(NanoVisionTextConfig, NanoVisionForCausalLM)
AutoModel.register(NanoVisionConfig, NanoVisionModel)
AutoModelForImageTextToText.register(NanoVisionConfig, NanoVisionForConditionalGeneration)
if hasattr(transformers, "AutoModelForVision2Seq"):  # removed in transformers 5
    transformers.AutoModelForVision2Seq.register(NanoVisionConfig, NanoVisionForConditionalGeneration)
# save_pretrained then writes the modeling files next to the weights: the folder loads with trust_remote_code=True
# where nanovision is not installed.
NanoVisionTextConfig.register_for_auto_class()
NanoVisionTextModel.register_for_auto_class("AutoModel")
NanoVisionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
NanoVisionConfig.register_for_auto_class()
NanoVisionModel.register_for_auto_class("AutoModel")
NanoVisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "NanoVisionConfig",
    "NanoVisionTextConfig",
    "NanoVisionTextModel",
    "NanoVisionForCausalLM",
    "NanoVisionModel",
    "NanoVisionForConditionalGeneration",
    "presets",
]
