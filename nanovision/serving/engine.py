"""vLLM engine helpers for nanovision checkpoints.

`create_vllm_engine` starts a `vllm.LLM` on a nanovision checkpoint (text or vision-language) and wraps it in a
`NanoVisionEngine` with batch `generate` (raw prompts, optional images per prompt) and `chat` (HF / OpenAI-style
messages with images inside content parts, through `vllm.LLM.chat`: vLLM renders the chat template and places the
images). vLLM is imported only when an engine is created, so nanovision imports without it; benchmarks/serving.py
measures throughput.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from ..tokenizer import IMAGE_TOKEN

logger = logging.getLogger("nanovision")

VLLM_INSTALL_HINT = 'pip install "nanovision[serve-cpu]" on a CPU machine, "nanovision[serve]" with a GPU'


def import_vllm():
    """The `vllm` module, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"Serving needs vLLM, which is not installed: {VLLM_INSTALL_HINT}.") from err
    return vllm


class Completion(str):
    """A generated text (it *is* the string) that also carries `token_ids`, `prompt_token_ids` and
    `finish_reason`."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None

    def __new__(cls, text, token_ids=(), prompt_token_ids=(), finish_reason=None):
        self = super().__new__(cls, text)
        self.token_ids = list(token_ids)
        self.prompt_token_ids = list(prompt_token_ids or ())
        self.finish_reason = finish_reason
        return self

    @property
    def text(self) -> str:
        return str(self)

    def to_dict(self) -> dict[str, Any]:
        return {"text": str(self), "token_ids": self.token_ids, "finish_reason": self.finish_reason}


def load_image(image: Any):
    """A PIL RGB image from a PIL image, a file path, a `data:image/...;base64,` URL or an http(s) URL
    (transformers' `load_image`), or from a content part's {"url"|"path"|"image": ...}."""
    from transformers.image_utils import load_image as load

    if isinstance(image, dict):
        for key in ("url", "path", "image"):
            if key in image:
                return load_image(image[key])
    return load(os.fspath(image) if isinstance(image, os.PathLike) else image)


def _content_part_image(part: dict[str, Any]):
    """The image source of a content part, or None for a non-image part."""
    kind = part.get("type")
    if kind == "image_url":  # OpenAI
        return part.get("image_url")
    if kind in ("image", "input_image"):  # HF: {"type": "image", "image"|"url"|"path": ...}
        for key in ("image", "url", "path", "image_url"):
            if part.get(key) is not None:
                return part[key]
        raise ValueError(f"Image content part {sorted(part)} holds no image (expected 'image', 'url' or 'path').")
    return None


def _vllm_messages(messages: Sequence[dict[str, Any]], image_token: str | None) -> list[dict[str, Any]]:
    """The conversation with every image part (HF or OpenAI style, path / URL / PIL) as a loaded PIL image part,
    which `vllm.LLM.chat` takes as it is (it reads local paths only under `allowed_local_media_path`). Text that
    holds `image_token` (a vision-language model's) is an error: the chat template writes one placeholder per image part, and a typed one has
    no image."""
    converted = []
    for message in messages:
        content = message.get("content")
        texts = [content] if isinstance(content, str) else [part.get("text") or "" for part in content or []
                                                             if isinstance(part, dict) and part.get("type") == "text"]
        if image_token and any(image_token in text for text in texts):
            raise ValueError(f"A {message.get('role')} message's text holds '{image_token}': pass images as image "
                             "content parts (the chat template writes their placeholders).")
        if isinstance(content, list):
            parts = []
            for part in content:
                source = _content_part_image(part) if isinstance(part, dict) else None
                parts.append(part if source is None else {"type": "image_pil", "image_pil": load_image(source)})
            message = {**message, "content": parts}
        converted.append(message)
    return converted


class NanoVisionEngine:
    """A `vllm.LLM` serving a nanovision checkpoint. Create it with `create_vllm_engine`."""

    def __init__(self, llm, model_path: str):
        self.llm = llm
        self.model_path = str(model_path)
        self.tokenizer = llm.get_tokenizer()
        hf_config = llm.llm_engine.model_config.hf_config
        self.is_multimodal = hf_config is not hf_config.get_text_config()
        self.image_token = getattr(self.tokenizer, "image_token", None) or IMAGE_TOKEN

    # -- generation ------------------------------------------------------------------------------

    def sampling_params(self, max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, **kwargs):
        """vLLM `SamplingParams`; `top_k` <= 0 or None disables top-k, temperature 0 is greedy."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                              top_k=int(top_k) if top_k and top_k > 0 else 0, **kwargs)

    def _request(self, prompt, images) -> dict[str, Any]:
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if isinstance(prompt, str):
            request: dict[str, Any] = {"prompt": prompt}
            if images:
                found = prompt.count(self.image_token)
                if found == 0:  # a bare prompt with images: the images go first, one placeholder each
                    request["prompt"] = self.image_token * len(images) + prompt
                elif found != len(images):
                    raise ValueError(f"The prompt holds {found} '{self.image_token}' placeholder(s) but "
                                     f"{len(images)} image(s) were given for it: pass one image per placeholder.")
            elif self.is_multimodal and self.image_token in prompt:  # also where vLLM runs without our renderer
                raise ValueError(f"The prompt holds {prompt.count(self.image_token)} '{self.image_token}' "
                                 "placeholder(s) but no image was given: attach one image per placeholder or remove "
                                 "the placeholder.")
        else:
            request = {"prompt_token_ids": [int(t) for t in prompt]}
        if images:
            if not self.is_multimodal:
                raise ValueError(f"{self.model_path} is a text-only model: it takes no images.")
            request["multi_modal_data"] = {"image": [load_image(image) for image in images]}
        return request

    def generate(self, prompts, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, images=None, use_tqdm: bool = False, **sampling_kwargs) -> list[Completion]:
        """Complete each prompt (a string, used as is, or a list of token ids); returns one `Completion` per prompt.

        `images`: for one prompt, an image or a list of images; for a batch, one entry (None, an image or a list)
        per prompt. Images are PIL images, file paths or data/http URLs. A string prompt holds one `<image>` per
        image; one with none gets them prepended. Extra `sampling_kwargs` (seed, ignore_eos, stop, ...) go to
        vLLM's `SamplingParams`.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                              isinstance(prompts[0], int))
        if single:
            if isinstance(images, (list, tuple)) and len(images) == 1 and isinstance(images[0], (list, tuple)):
                images = images[0]  # [[images of the one prompt]]
            prompts, images = [prompts], [images]
        prompts = list(prompts)
        if images is None:
            images = [None] * len(prompts)
        elif len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} image entries for {len(prompts)} prompts: pass one entry "
                             "(None, an image or a list of images) per prompt.")
        requests = [self._request(prompt, entry) for prompt, entry in zip(prompts, images)]
        params = self.sampling_params(max_tokens, temperature, top_p, top_k, **sampling_kwargs)
        outputs = self.llm.generate(requests, params, use_tqdm=use_tqdm)
        return [Completion(out.outputs[0].text, out.outputs[0].token_ids, out.prompt_token_ids,
                           out.outputs[0].finish_reason) for out in outputs]

    def chat(self, messages, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             add_generation_prompt: bool = True, use_tqdm: bool = False, **sampling_kwargs) -> list[Completion]:
        """Answer a conversation, or a batch of conversations; returns one `Completion` per conversation.

        Messages are HF / OpenAI style: {"role": ..., "content": str | [parts]}, image parts being
        {"type": "image", "image": PIL | path | URL} (or "url"/"path") or {"type": "image_url", "image_url":
        {"url": ...}} with a file path, a data URL or an http(s) URL.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self.sampling_params(max_tokens, temperature, top_p, top_k, **sampling_kwargs)
        image_token = self.image_token if self.is_multimodal else None
        outputs = self.llm.chat([_vllm_messages(conversation, image_token) for conversation in conversations],
                                params, use_tqdm=use_tqdm, add_generation_prompt=add_generation_prompt)
        return [Completion(out.outputs[0].text, out.outputs[0].token_ids, out.prompt_token_ids,
                           out.outputs[0].finish_reason) for out in outputs]

    def close(self) -> None:
        """Shut the engine down (its worker processes exit)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        shutdown = getattr(llm, "shutdown", None) or getattr(core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        import gc

        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plugin_installed() -> bool:
    return any(ep.value.startswith("nanovision.") for ep in entry_points(group="vllm.general_plugins"))


def default_cpu_kv_cache_bytes() -> int | None:
    """On vLLM's CPU backend with no KV cache size set (VLLM_CPU_KVCACHE_SPACE unset): a quarter of the memory
    available now on NUMA node 0, where vLLM binds its worker. vLLM's own default reserves 90% of the node's *total*
    memory (`--gpu-memory-utilization` 0.9) and refuses to start wherever less than that is free: on a shared
    machine, or one whose NUMA node is a fraction of its RAM. None on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    return get_memory_node_info(0).available_memory // 4


def create_vllm_engine(model_path, tensor_parallel_size: int = 1, dtype: str = "auto",
                       **engine_kwargs) -> NanoVisionEngine:
    """Start vLLM on a nanovision checkpoint. `engine_kwargs` go to `vllm.LLM` (max_model_len,
    gpu_memory_utilization, kv_cache_memory_bytes, limit_mm_per_prompt, seed, enforce_eager, ...); on a CPU the KV
    cache defaults to `default_cpu_kv_cache_bytes()`, and `tokenizer_mode` to the plugin's "nanovision" (vLLM's HF
    tokenizer, with a renderer that refuses a prompt holding `<image>` placeholders but no image)."""
    LLM = import_vllm().LLM

    from .plugin import TOKENIZER_MODE, register, register_renderer

    register()  # this process; vLLM's own processes load it from the vllm.general_plugins entry point
    if not plugin_installed():
        if "trust_remote_code" not in engine_kwargs:
            logger.warning("nanovision's vLLM plugin entry point is not installed (pip install -e . registers it): "
                           "serving %s as remote code (trust_remote_code=True).", model_path)
            engine_kwargs["trust_remote_code"] = True
    elif register_renderer():  # the engine's processes know the mode too (the entry point)
        engine_kwargs.setdefault("tokenizer_mode", TOKENIZER_MODE)  # refuses text-only prompts holding <image>
    if not {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(engine_kwargs):
        kv_cache_bytes = default_cpu_kv_cache_bytes()
        if kv_cache_bytes is not None:
            engine_kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    llm = LLM(model=str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype, **engine_kwargs)
    return NanoVisionEngine(llm, model_path)
