"""Tiny random-weight checkpoints and HF references for the vLLM serving tests (test_serving.py,
test_openai_server.py). Shapes respect vLLM's CPU attention (head_dim 32: it has no kernel for 16)."""

import base64
import contextlib
import io
import os
import signal
import subprocess
import time
import urllib.request

import torch
from conftest import TINY_VISION, randomize

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU: plenty for these models
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["red", "green", "blue", "circle", "square", "what", "color", "is", "the", "a", "shape"]
EOS = 1  # <|end|>


def train_tiny_tokenizer():
    from nanovision.tokenizer import train_tokenizer

    return train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, vocab_size=300)


def build_text_checkpoint(path, tokenizer):
    """nanochat's block (relu², parameter-free norms and QK-norm, embedding norm, logit softcap), 2 layers of 4
    heads of 32."""
    from nanovision import NanoVisionForCausalLM, presets

    config = presets.nanochat_config(depth=2, head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=512)
    torch.manual_seed(0)
    model = randomize(NanoVisionForCausalLM(config), std=0.1, seed=1).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_vlm_checkpoint(path, tokenizer):
    """Llama-style language model (SwiGLU, GQA 4:2 heads of 32) + 1-layer SigLIP (32px, 8px patches) + pixel
    shuffle with a position embedding per image token (as the quickstart's): 4 image tokens per image."""
    from nanovision import (
        NanoVisionConfig,
        NanoVisionForConditionalGeneration,
        NanoVisionImageProcessor,
        NanoVisionProcessor,
        presets,
    )

    text = presets.text_config(depth=2, head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=512)
    config = NanoVisionConfig(text_config=text, vision_config=dict(TINY_VISION), image_token_id=6,
                              connector_position_embedding=True)
    torch.manual_seed(0)
    model = randomize(NanoVisionForConditionalGeneration(config), std=0.1, seed=2).eval()
    processor = NanoVisionProcessor(NanoVisionImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                                    num_image_tokens=config.num_image_tokens)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def color_image(rgb, size=(40, 30)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, rgb)
    ImageDraw.Draw(image).ellipse((5, 5, 25, 25), fill=tuple(255 - c for c in rgb))
    return image


def png_data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def hf_greedy(model, processor, prompt, images=None, max_new_tokens=8, stop_at_eos=False):
    """HF `generate` new token ids for one prompt (a processor or a tokenizer; images: PIL list)."""
    if images:
        inputs = processor(text=prompt, images=images, return_tensors="pt")
    else:
        inputs = processor(text=prompt, return_tensors="pt") if hasattr(processor, "image_processor") else \
            processor(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2,
                             eos_token_id=EOS if stop_at_eos else None)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new[: new.index(EOS) + 1] if stop_at_eos and EOS in new else new


def serving_env():
    """The environment for a served subprocess: vLLM's own defaults (no KV cache size, no log level) and this
    Python's commands first on PATH."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def running_server(cmd, log_path, url, timeout=600):
    """Start `cmd` (an argument list) with its output in `log_path`, wait until `url`/health answers, stop it (its
    whole process group: API server, engine core, worker) on exit."""
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=serving_env(), start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {server.returncode}:\n" + open(log_path).read()[-6000:])
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd} did not become healthy:\n" + open(log_path).read()[-6000:])
            time.sleep(2)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)
        log.close()
