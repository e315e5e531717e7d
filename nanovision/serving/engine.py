"""vLLM engine helpers for nanovision checkpoints.

`create_vllm_engine` starts a `vllm.LLM` on a nanovision checkpoint (text or vision-language) and wraps it in a
`NanoVisionEngine` with batch `generate` (raw prompts, optional images per prompt) and `chat` (HF / OpenAI-style
messages with images inside content parts). `benchmark_throughput` and `compare_backends` measure it against HF
`generate`. vLLM is imported only when an engine is created, so nanovision imports without it.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

logger = logging.getLogger("nanovision")

IMAGE_TOKEN = "<image>"
# Ids 0..9 are nanovision's special tokens (tokenizer.SPECIAL_TOKENS): random benchmark prompts avoid them.
FIRST_ORDINARY_TOKEN_ID = 10


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
    """A PIL RGB image from a PIL image, a file path, a `data:image/...;base64,` URL or an http(s) URL."""
    import PIL.Image

    from ..processing_nanovision import _load_image_source, pil_to_rgb

    if isinstance(image, PIL.Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return pil_to_rgb(_load_image_source(image, "image"))
    if isinstance(image, dict):  # {"url": ...} / {"path": ...} as in content parts
        for key in ("url", "path", "image"):
            if key in image:
                return load_image(image[key])
    raise TypeError(f"Cannot load an image from {type(image).__name__}: pass a PIL image, a path or a data/http URL.")


def _content_part_image(part: dict[str, Any]):
    """The image source of a content part, or None for a non-image part."""
    kind = part.get("type")
    if kind == "image_url":  # OpenAI
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    if kind in ("image", "input_image"):  # HF: {"type": "image", "image"|"url"|"path": ...}
        for key in ("image", "url", "path", "image_url"):
            if part.get(key) is not None:
                value = part[key]
                return value.get("url") if isinstance(value, dict) else value
        raise ValueError(f"Image content part {sorted(part)} holds no image (expected 'image', 'url' or 'path').")
    return None


def split_chat_images(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages for the chat template (image parts become {"type": "image"}) and their images, in order."""
    rendered, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                source = _content_part_image(part) if isinstance(part, dict) else None
                if source is None:
                    parts.append(part)
                else:
                    images.append(source)
                    parts.append({"type": "image"})
            message = {**message, "content": parts}
        rendered.append(message)
    return rendered, images


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

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
        """The prompt text of one conversation and the images of its content parts."""
        rendered, images = split_chat_images(messages)
        prompt = self.tokenizer.apply_chat_template(rendered, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
        return prompt, images

    def chat(self, messages, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             add_generation_prompt: bool = True, use_tqdm: bool = False, **sampling_kwargs) -> list[Completion]:
        """Answer a conversation, or a batch of conversations; returns one `Completion` per conversation.

        Messages are HF / OpenAI style: {"role": ..., "content": str | [parts]}, image parts being
        {"type": "image", "image": PIL | path | URL} (or "url"/"path") or {"type": "image_url", "image_url":
        {"url": ...}} with a file path, a data URL or an http(s) URL.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts, images = [], []
        for conversation in conversations:
            prompt, conversation_images = self.apply_chat_template(conversation, add_generation_prompt)
            prompts.append(prompt)
            images.append(conversation_images or None)
        return self.generate(prompts, max_tokens, temperature, top_p, top_k, images=images, use_tqdm=use_tqdm,
                             **sampling_kwargs)

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


def _plugin_installed() -> bool:
    return any(ep.value.startswith("nanovision.") for ep in entry_points(group="vllm.general_plugins"))


def create_vllm_engine(model_path, tensor_parallel_size: int = 1, dtype: str = "auto",
                       **engine_kwargs) -> NanoVisionEngine:
    """Start vLLM on a nanovision checkpoint. `engine_kwargs` go to `vllm.LLM` (max_model_len,
    gpu_memory_utilization, limit_mm_per_prompt, seed, enforce_eager, ...)."""
    from vllm import LLM

    from .plugin import register

    register()  # this process; vLLM's own processes load it from the vllm.general_plugins entry point
    if not _plugin_installed() and "trust_remote_code" not in engine_kwargs:
        logger.warning("nanovision's vLLM plugin entry point is not installed (pip install -e . registers it): "
                       "serving %s as remote code (trust_remote_code=True).", model_path)
        engine_kwargs["trust_remote_code"] = True
    llm = LLM(model=str(model_path), tensor_parallel_size=tensor_parallel_size, dtype=dtype, **engine_kwargs)
    return NanoVisionEngine(llm, model_path)


# ---------------------------------------------------------------------------------------------- measuring


def random_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of ordinary (non-special) tokens, distinct so that no prefix cache hides work."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(prompt_len)]
            for _ in range(num_prompts)]


def _vocab_size(engine: NanoVisionEngine) -> int:
    """Ids random prompts may use: the model's vocabulary, within the tokenizer's."""
    vocab_size = engine.llm.llm_engine.model_config.hf_config.get_text_config().vocab_size
    return min(vocab_size, len(engine.tokenizer)) if engine.tokenizer is not None else vocab_size


def _request_latencies(outputs) -> list[float]:
    """End-to-end seconds per request from vLLM's request stats, when it kept them (log stats on)."""
    latencies = []
    for out in outputs:
        stats = getattr(out, "metrics", None)
        first, start_ts, end_ts = (getattr(stats, name, 0.0) or 0.0
                                   for name in ("first_token_latency", "first_token_ts", "last_token_ts"))
        if not first or not end_ts:
            return []
        latencies.append(first + end_ts - start_ts)
    return latencies


def benchmark_throughput(engine: NanoVisionEngine, num_prompts: int = 32, prompt_len: int = 128,
                         max_tokens: int = 128, seed: int = 0, warmup: bool = True, prompts=None,
                         images=None, **sampling_kwargs) -> dict[str, float]:
    """Greedy generation of `max_tokens` tokens (EOS ignored) for `num_prompts` random prompts of `prompt_len`
    tokens, all submitted at once. Returns output tokens/s, requests/s and latency (mean end-to-end seconds per
    request where vLLM records it, else the batch's wall time; `batch_latency_s` always).

    `prompts` / `images` replace the random prompts (e.g. image prompts for a vision-language model); extra
    `sampling_kwargs` go to `SamplingParams` (e.g. detokenize=False)."""
    if prompts is None:
        prompts = random_prompts(num_prompts, prompt_len, _vocab_size(engine), seed)
    num_prompts = len(prompts)
    kwargs = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling_kwargs)
    if warmup:  # a prompt of its own, so that the prefix cache gives the timed run nothing
        engine.generate(random_prompts(1, 16, _vocab_size(engine), seed + 12345), **{**kwargs, "max_tokens": 4})
    start = time.perf_counter()
    outputs = engine.llm.generate([engine._request(p, i) for p, i in
                                   zip(prompts, images or [None] * num_prompts)],
                                  engine.sampling_params(**kwargs), use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    latencies = _request_latencies(outputs)
    latency = sum(latencies) / len(latencies) if latencies else elapsed
    return throughput_row(num_prompts, prompt_len, max_tokens, elapsed, output_tokens, latency)


def throughput_row(num_prompts, prompt_len, max_tokens, elapsed, output_tokens, latency) -> dict[str, float]:
    return {
        "num_prompts": num_prompts,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "requests_per_s": num_prompts / elapsed,
        "latency_s": latency,
        "batch_latency_s": elapsed,
    }


def hf_generate_throughput(model_path, num_prompts: int = 32, prompt_len: int = 128, max_tokens: int = 128,
                           seed: int = 0, device: str | None = None, dtype=None, model=None) -> dict[str, float]:
    """The same measurement as `benchmark_throughput` with HF `generate` (one batch, greedy, no EOS stop)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import nanovision  # noqa: F401  registers the Auto classes

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if model is None:
        config = AutoConfig.from_pretrained(model_path)
        auto = AutoModelForCausalLM if config is config.get_text_config() else AutoModelForImageTextToText
        model = auto.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    vocab_size = model.config.get_text_config().vocab_size
    ids = torch.tensor(random_prompts(num_prompts, prompt_len, vocab_size, seed), device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=max_tokens)
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, **{**kwargs, "min_new_tokens": 2})  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    output_tokens = int((out.shape[1] - prompt_len) * num_prompts)
    # one batch: every request finishes with it
    return throughput_row(num_prompts, prompt_len, max_tokens, elapsed, output_tokens, latency=elapsed)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of `rows` (dicts) over `columns`."""
    def cell(value):
        return f"{value:,.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(value.rjust(w) for value, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def compare_backends(model_path, num_prompts: int = 32, prompt_len: int = 128, max_tokens: int = 128,
                     engine: NanoVisionEngine | None = None, hf_device: str | None = None,
                     **engine_kwargs) -> dict[str, dict[str, float]]:
    """Print and return vLLM vs HF `generate` output tokens/s and latency on the same random prompts.

    `engine`: reuse a running engine; otherwise one is created with `engine_kwargs` and closed afterwards."""
    own = engine is None
    if own:
        engine = create_vllm_engine(model_path, **engine_kwargs)
    try:
        vllm_result = benchmark_throughput(engine, num_prompts, prompt_len, max_tokens)
    finally:
        if own:
            engine.close()
    hf_result = hf_generate_throughput(model_path, num_prompts, prompt_len, max_tokens, device=hf_device)
    rows = [{"backend": "vLLM", **vllm_result}, {"backend": "HF generate", **hf_result}]
    speedup = vllm_result["output_tokens_per_s"] / hf_result["output_tokens_per_s"]
    print(f"{model_path}: {num_prompts} prompts x {prompt_len} tokens in, {max_tokens} out (greedy, EOS ignored)")
    print(format_table(rows, ["backend", "output_tokens_per_s", "requests_per_s", "latency_s", "elapsed_s"]))
    print(f"vLLM / HF output tokens/s: {speedup:.1f}x")
    return {"vllm": vllm_result, "hf": hf_result, "speedup": speedup}
