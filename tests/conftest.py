import os
import sys

import pytest
import torch

# Triton picks its driver when first imported (nanovision imports it through the modeling file): without a GPU the
# kernels must run on the CPU interpreter, so this has to be set before any test module imports nanovision.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_text_config(**overrides):
    from nanovision import NanoVisionTextConfig

    settings = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    settings.update(overrides)
    return NanoVisionTextConfig(**settings)


def randomize(model, std=0.2, seed=0):
    """nanochat's init zeroes output projections, which would make attention invisible to a test: give every
    parameter random values so that comparisons can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std + (1.0 if param.ndim == 1 else 0.0))
    return model


@pytest.fixture
def no_nanovision_env(tmp_path):
    """Environment and cwd for a subprocess that cannot import nanovision (proves remote code is self-contained)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")
    return env


def run_without_nanovision(code, env, cwd):
    import subprocess

    # Block nanovision however it is installed (editable, site-packages, cwd): remote code must not need it.
    guard = (
        "import sys\n"
        "class _BlockNanovision:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'nanovision':\n"
        "            raise ModuleNotFoundError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, _BlockNanovision())\n"
    )
    result = subprocess.run([sys.executable, "-c", guard + code], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2)


def tiny_vlm_config(text=None, **overrides):
    from nanovision import NanoVisionConfig

    settings = dict(text_config=text or tiny_text_config(), vision_config=dict(TINY_VISION),
                    perceiver_num_queries=4, perceiver_num_heads=2, image_token_id=6)
    settings.update(overrides)
    return NanoVisionConfig(**settings)


def probe_inputs(config):
    """Fixed inputs for comparing two copies of a model (text or VLM): 2 rows of random ids, and for a VLM an image
    block in front of each row with its pixel values."""
    generator = torch.Generator().manual_seed(0)
    text = config.get_text_config()
    input_ids = torch.randint(3, text.vocab_size, (2, 20), generator=generator)
    if not hasattr(config, "vision_config"):
        return {"input_ids": input_ids}
    input_ids[input_ids == config.image_token_id] = 3
    image = torch.full((2, config.num_image_tokens), config.image_token_id)
    size = config.vision_config.image_size
    return {"input_ids": torch.cat([image, input_ids], dim=1),
            "pixel_values": torch.randn(2, 3, size, size, generator=generator)}
