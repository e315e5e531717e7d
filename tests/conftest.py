import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

# The kernel tests run the Triton kernels on the CPU interpreter, or with NANOVISION_TEST_CUDA=1 (on a GPU machine)
# compiled, on CUDA tensors. Triton picks its driver when first imported (nanovision imports it through the modeling
# file), so this has to be set before any test module imports nanovision.
TEST_ON_CUDA = os.environ.get("NANOVISION_TEST_CUDA", "0") == "1"
if TEST_ON_CUDA and not torch.cuda.is_available():
    raise pytest.UsageError("NANOVISION_TEST_CUDA=1 asks for the kernel tests on CUDA, but no CUDA device is visible")
if not TEST_ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if TEST_ON_CUDA else "cpu"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# this checkout's nanovision, also under a plain `pytest` (which does not put the working directory on sys.path)
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --------------------------------------------------------------------------- #
# Kernel tests: every op forward and backward against a float64 reference on fresh random inputs, with the buffers
# the kernels allocate poisoned with NaN so that unwritten elements fail the comparison.
# --------------------------------------------------------------------------- #
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# relative L2 error bounds vs float64 (bf16 is loose: bf16 rounding, and the Triton interpreter truncates when casting
# fp32 -> bf16)
REL_TOL = {F32: 2e-5, BF16: 2e-2, F16: 5e-3}
DTYPES = [F32, BF16]
# RMSNorm gradients from n rebuilt out of a bf16 / fp16 output (2^-8 / 2^-11 relative rounding; the interpreter's
# truncation to bf16 biases the weight gradient's sums)
REBUILT_TOL = {BF16: 1e-2, F16: 2e-3}


def seed_case(*parts):
    """A seed of its own for each test case (NANOVISION_TEST_SEED shifts them all)."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()) + int(os.environ.get("NANOVISION_TEST_SEED", "0")))


def rand(*shape, dtype=F32, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float64) * scale + offset).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def f64(t):
    return t.detach().double().requires_grad_(True)


def assert_close(out, ref, dtype, name="", tol=None):
    """`out` against a (float64) reference: relative L2 error within `tol` (REL_TOL[dtype] by default) and every
    element within 8 * tol * max |ref|; non-finite values (an unwritten output) fail."""
    assert out is not None, f"{name}: missing"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values (unwritten output?)"
    tol = REL_TOL[dtype] if tol is None else tol
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item() / max(denom, 1e-12)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
    # elementwise bound too, so a few wrong elements cannot hide in the norm
    atol = tol * max(ref64.abs().max().item(), 1e-6)
    worst = (out64 - ref64).abs().max().item()
    assert worst <= 8 * atol, f"{name}: max abs error {worst:.3e} > {8 * atol:.3e}"


@pytest.fixture
def poison(monkeypatch):
    """Fill every floating tensor made with torch.empty / empty_like with NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


def record_launches(monkeypatch, module):
    """The positional arguments of every Triton launch that the op file `module` makes through wrap_triton, in
    order."""
    launches = []
    wrap_triton = module.wrap_triton

    def recording_wrap(kernel):
        launcher = wrap_triton(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append(args)
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(module, "wrap_triton", recording_wrap)
    return launches


def tensor_pointers(args):
    return [a.data_ptr() for a in args if isinstance(a, torch.Tensor)]


def rotary_angles(batch, T, D, dtype, base=10000.0):
    """(cos, sin) [batch, T, D] as the model builds them (cat(freqs, freqs)), each row at other positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64, device=DEVICE) / D))
    pos = torch.arange(T, dtype=torch.float64, device=DEVICE)[None, :] + 3 * torch.arange(
        batch, dtype=torch.float64, device=DEVICE)[:, None]
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# --------------------------------------------------------------------------- #
# Model tests
# --------------------------------------------------------------------------- #


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
