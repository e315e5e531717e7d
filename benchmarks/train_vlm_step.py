"""VLM SFT-step throughput on one GPU: nanovision against the same-sized model built from transformers' own classes
(LlavaForConditionalGeneration: SigLIP tower + MLP projector + Llama), and that model with Liger kernels, in one run.

Shape: a SigLIP-B/16-sized tower (12 layers, width 768, MLP 3072, 12 heads) at 224 or 384 px, the connector, the d20
language model (`nanovision.presets.text_config(depth=20)`: 20 layers, hidden 1280, 10 heads, 5 KV heads, SwiGLU 3456,
vocab 50304) and 8 packed rows of 2048 tokens; each row holds documents of one image and text (4 a row at 224 px, 3 at
384 px). nanovision's pixel-shuffle connector (r = 2) gives an image a quarter of the positions Llava's projector
gives it (49 against 196 at 224 px), over a 4x wider first linear: both models see the same images, the same
document lengths and the same FLOPs, and Llava's documents hold fewer text tokens. bf16 autocast over fp32 master
weights, torch fused AdamW; a step is forward + loss + backward + optimizer step; the tower is trained or frozen.

    python benchmarks/train_vlm_step.py --out benchmarks/results/train_vlm_step.json [--resolutions 224 384]
        [--towers trained frozen] [--variants ...] [--rounds 3] [--profile 2] [--tower-alone] [--smoke]
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from train_step import cuda_ms, layers_norm_own_input, matmul_tflops, time_steps  # benchmarks/ is the script's directory
from transformers import AutoModelForImageTextToText, LlamaConfig, LlavaConfig, SiglipVisionConfig

import nanovision
from nanovision.configuration_nanovision import FUSED_KERNEL_OPS
from nanovision.kernels import describe_backends
from nanovision.training.collator import PackedDataCollator

SHAPE = dict(depth=20, head_dim=128, vocab=50304, seq=2048, batch=8,
             tower=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        patch_size=16))
SMOKE = dict(depth=2, head_dim=64, vocab=1024, seq=2048, batch=2,
             tower=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                        patch_size=16))
IMAGES_PER_ROW = {224: 4, 384: 3}
IMAGE_TOKEN_ID = 6
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def tower_config(s, resolution):
    return SiglipVisionConfig(image_size=resolution, vision_use_head=False, **s["tower"])


def nanovision_vlm(s, resolution, attn, ops=True):
    """ops: the config's use_fused_kernels (True: every op)."""
    text = nanovision.presets.text_config(depth=s["depth"], head_dim=s["head_dim"], vocab_size=s["vocab"],
                                          max_position_embeddings=s["seq"], use_fused_kernels=ops)
    config = nanovision.NanoVisionConfig(text_config=text, vision_config=tower_config(s, resolution),
                                         image_token_id=IMAGE_TOKEN_ID)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn)


def llava_vlm(s, resolution, attn="sdpa"):
    """The same shape from transformers' classes: SigLIP's last hidden state, all its patches, Llama."""
    text = nanovision.presets.text_config(depth=s["depth"], head_dim=s["head_dim"], vocab_size=s["vocab"])
    llama = LlamaConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
                        head_dim=text.head_dim, max_position_embeddings=s["seq"], tie_word_embeddings=False)
    vision = tower_config(s, resolution)
    config = LlavaConfig(vision_config=vision, text_config=llama, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=(resolution // vision.patch_size) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="full", tie_word_embeddings=False)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn)


def liger_llava(s, resolution):
    """Llava with Liger's kernels: RMSNorm, SwiGLU, rotary and fused linear cross-entropy in the Llama (its patch
    also replaces transformers' Llama rotary function for the whole process: run these variants last)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llava

    model = llava_vlm(s, resolution)
    apply_liger_kernel_to_llava(model=model)
    return model


def without_zero_weights(model, std=0.02, seed=0):
    """nanovision zero-initialises its output projections and head; timing on zeros can flatter a kernel (and
    compares unlike with Llava's random init), so every all-zero weight matrix gets random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


# name -> (builder(s, resolution), compile: True, False or "try" (eager if compiling fails), takes the flash kwargs)
VARIANTS = {
    "llava sdpa + compile": (llava_vlm, True, False),
    "nanovision fused + sdpa + compile": (lambda s, r: nanovision_vlm(s, r, "sdpa"), True, False),
    "nanovision fused + flash_attention_4 + compile": (lambda s, r: nanovision_vlm(s, r, "flash_attention_4"), "try",
                                                       True),
    "nanovision fused + flash_attention_4": (lambda s, r: nanovision_vlm(s, r, "flash_attention_4"), False, True),
    "nanovision fused + flash_attention_2 + compile": (lambda s, r: nanovision_vlm(s, r, "flash_attention_2"), "try",
                                                       True),
    "nanovision fused + flash_attention_2": (lambda s, r: nanovision_vlm(s, r, "flash_attention_2"), False, True),
    "nanovision fused + nanovision_varlen": (lambda s, r: nanovision_vlm(s, r, "nanovision_varlen"), False, True),
    "nanovision fused + nanovision_varlen + compile": (lambda s, r: nanovision_vlm(s, r, "nanovision_varlen"), True,
                                                       True),
    # the ablation of the tower's fused LayerNorms (inductor's own LayerNorm kernels there instead)
    "nanovision fused but layer_norm + nanovision_varlen + compile": (
        lambda s, r: nanovision_vlm(s, r, "nanovision_varlen", [op for op in FUSED_KERNEL_OPS if op != "layer_norm"]),
        True, True),
    # the ablation of the layers running the next layer's input norm with their residual add
    "nanovision fused + nanovision_varlen + compile, layers norm their own input": (
        lambda s, r: layers_norm_own_input(nanovision_vlm(s, r, "nanovision_varlen")), True, True),
    "nanovision fused + flex_attention + compile": (lambda s, r: nanovision_vlm(s, r, "flex_attention"), True, False),
    "llava + liger + compile": (liger_llava, "try", False),
}
BASELINE = "llava sdpa + compile"
COMPILE_FAILED = {}  # variant -> the error its first compile raised; later configurations run it eager at once


def document_lengths(s, images_per_row, shortest, generator):
    """Per row, `images_per_row` document lengths of at least `shortest` that fill the row exactly."""
    rows = []
    for _ in range(s["batch"]):
        spare = s["seq"] - images_per_row * shortest
        if spare < 0:
            raise ValueError(f"{images_per_row} documents of at least {shortest} tokens do not fit a {s['seq']}-token row")
        cuts = torch.randint(0, spare + 1, (images_per_row - 1,), generator=generator).sort().values.tolist()
        rows.append([shortest + b - a for a, b in zip([0, *cuts], [*cuts, spare])])
    return rows


def vlm_batch(s, rows, image_tokens, pixel_values, device, seed=0):
    """Packed rows of documents (one image's placeholders, then text) through PackedDataCollator; the loss is on
    the text only. The same `rows` and `pixel_values` for both models: only `image_tokens` differs."""
    generator = torch.Generator().manual_seed(seed)
    features, first_image = [], 0
    for lengths in rows:
        ids, labels = [], []
        for length in lengths:
            text = torch.randint(16, s["vocab"], (length - image_tokens,), generator=generator).tolist()
            ids += [IMAGE_TOKEN_ID] * image_tokens + text
            labels += [-100] * image_tokens + text
        features.append(dict(input_ids=ids, labels=labels, seq_lengths=lengths,
                             pixel_values=pixel_values[first_image:first_image + len(lengths)]))
        first_image += len(lengths)
    batch = PackedDataCollator(max_length=s["seq"], return_flash_attn_kwargs=True)(features)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def part_times(model, batch, tower_trained):
    """Where an eager step's time goes: forward + backward of the tower, the connector and the language model, each
    on its own (on detached inputs of the real shapes) under bf16 autocast; the rest of the step (embedding, head,
    loss, optimizer) is the whole eager step minus these. Both model families name the parts alike. Measured after
    the variant's compiled steps, they split one variant's step; across variants they have differed by more than the
    parts do (the towers alone: `--tower-alone`)."""
    inner = model.model
    lm_kwargs = {k: batch[k] for k in ("position_ids", *FLASH_KWARGS) if k in batch}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with autocast:
        patches = inner.vision_tower(pixel_values=batch["pixel_values"]).last_hidden_state.detach()
        embeds = inner.multi_modal_projector(patches).detach()
    inputs_embeds = torch.randn(*batch["input_ids"].shape, embeds.shape[-1], device=embeds.device)

    def run(fn, needs_grad=True):
        def step():
            with autocast:
                out = fn()
            if needs_grad:
                out.backward(torch.ones_like(out))
        return step

    tower = lambda: inner.vision_tower(pixel_values=batch["pixel_values"]).last_hidden_state  # noqa: E731
    parts = {
        "vision tower": cuda_ms(run(tower) if tower_trained else torch.no_grad()(run(tower, needs_grad=False))),
        "connector": cuda_ms(run(lambda: inner.multi_modal_projector(patches.requires_grad_(tower_trained)))),
        "language model": cuda_ms(run(lambda: inner.language_model(
            inputs_embeds=inputs_embeds.requires_grad_(), **lm_kwargs).last_hidden_state)),
    }
    model.zero_grad(set_to_none=True)
    return parts


def tower_alone(s, resolution, pixel_values):
    """The SigLIP tower of each model family by itself, eager under bf16 autocast on the same images: forward +
    backward (trained) and forward without grad (frozen), ms. Both families build transformers' SiglipVisionModel
    from the same config, so the figures should agree; this checks that the step comparison is about the rest."""
    times = {}
    for family, build in (("nanovision", lambda: nanovision_vlm(s, resolution, "nanovision_varlen")),
                          ("llava", lambda: llava_vlm(s, resolution))):
        torch.manual_seed(0)
        tower = without_zero_weights(build()).model.vision_tower.to(pixel_values.device).train()

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return tower(pixel_values=pixel_values).last_hidden_state

        def trained():
            out = forward()
            out.backward(torch.ones_like(out))

        times[family] = dict(trained_ms=cuda_ms(trained), frozen_ms=cuda_ms(torch.no_grad()(forward)))
    return times


def start_variant(name, s, resolution, tower_trained, device, batch, images, steps, warmup, profile, others_gib):
    """Build a variant and time its first round (compile included; then `profile` steps profiled, if asked): (row,
    [model, runner, inputs]). `others_gib`: the memory that other variants alive at the same time hold, taken off the
    peak."""
    held = torch.cuda.memory_allocated()
    build, compiled, flash_kwargs = VARIANTS[name]
    torch.manual_seed(0)
    model = without_zero_weights(build(s, resolution)).to(device).train()
    model.model.vision_tower.requires_grad_(tower_trained)
    inputs = {k: v for k, v in batch.items() if flash_kwargs or k not in FLASH_KWARGS}
    row = dict(variant=name, resolution=resolution, tower="trained" if tower_trained else "frozen")
    start = time.perf_counter()
    runner = model
    if compiled and name not in COMPILE_FAILED:
        runner = torch.compile(model)
        try:
            seconds, peak_gib, loss, kernels = time_steps(runner, inputs, None, steps, warmup, profile)
        except Exception as error:  # noqa: BLE001  a compile that fails is reported, then the eager model is timed
            if compiled != "try":
                raise
            COMPILE_FAILED[name] = repr(error)[:300]
            runner = model
            torch._dynamo.reset()
    if runner is model:
        seconds, peak_gib, loss, kernels = time_steps(model, inputs, None, steps, warmup, profile)
    if compiled and name in COMPILE_FAILED:
        row["compile_error"] = COMPILE_FAILED[name]
    row["compiled"] = bool(compiled) and "compile_error" not in row
    row["wall_s"] = time.perf_counter() - start  # compile included
    row.update(images=images, tokens=batch["input_ids"].numel(), round_step_ms=[], peak_gib=0.0,
               resident_gib=(torch.cuda.memory_allocated() - held) / 2**30)
    if profile:
        row["profile"] = kernels
    add_round(row, seconds, peak_gib - others_gib, loss)
    return row, [model, runner, inputs]


def held_by_others(live, row=None):
    """GiB that the live variants other than `row` hold between their steps (their weights)."""
    return sum(other["resident_gib"] for other, _, _ in live if other is not row)


def add_round(row, seconds, peak_gib, loss):
    """One round's timing into the row: its step time is the median over rounds, its peak memory the largest."""
    row["round_step_ms"].append(seconds * 1e3)
    step = statistics.median(row["round_step_ms"]) / 1e3
    row.update(step_ms=step * 1e3, images_per_s=row["images"] / step, tokens_per_s=row["tokens"] / step,
               peak_gib=max(row["peak_gib"], peak_gib), loss=loss)


def finish_variant(row, objects, tower_trained, profile):
    """The eager parts of a step (with `profile`), then the variant's memory back (`objects`, the list start_variant
    returned, is emptied)."""
    model, runner, inputs = objects
    objects.clear()
    if profile:
        eager_step, _, _, _ = time_steps(model, inputs, None, 3, 2)
        row["eager_parts_ms"] = part_times(model, inputs, tower_trained)
        row["eager_parts_ms"]["rest: embedding, head + loss, optimizer"] = (
            eager_step * 1e3 - sum(row["eager_parts_ms"].values()))
        row["eager_step_ms"] = eager_step * 1e3
    del model, runner, inputs
    gc.collect()
    torch.cuda.empty_cache()


def release():
    """Memory and compiled code back, once no variant of the group is alive (a reset would recompile the others)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def add_ratios(results):
    """Speed (tokens/s; images/s gives the same ratio) and peak memory of each row over the Llava baseline's at the
    same resolution and tower setting. With several rounds the speed ratio is the median of the rounds' own ratios
    (each round times every variant once, back to back), so that a drift of the GPU's clocks between rounds cancels."""
    for row in (r for r in results if "error" not in r):
        base = next((r for r in results if r["variant"] == BASELINE and "error" not in r and r["resolution"] == row["resolution"]
                     and r["tower"] == row["tower"]), None)
        if base is not None:
            rounds = list(zip(base["round_step_ms"], row["round_step_ms"]))
            row["round_speed_vs_llava"] = [b / r for b, r in rounds]
            row["speed_vs_llava"] = statistics.median(row["round_speed_vs_llava"])
            row["memory_vs_llava"] = row["peak_gib"] / base["peak_gib"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_vlm_step.json"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--resolutions", nargs="*", type=int, default=[224, 384], choices=sorted(IMAGES_PER_ROW))
    parser.add_argument("--towers", nargs="*", default=["trained", "frozen"], choices=["trained", "frozen"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each configuration's variants this many times in turn, all of them alive at once "
                             "(compiled once); the step is the median round, the speed ratio the median of the "
                             "rounds' ratios. Llava's step drifts slower with a third compiled variant alive: take "
                             "ratios from runs of two variants (RESULTS.md, 2026-12-04)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, for a quick check")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many steps (top kernels) and time the eager parts of a step")
    parser.add_argument("--tower-alone", action="store_true",
                        help="first time each family's vision tower by itself at each resolution (eager)")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds > 1 and len(args.resolutions) * len(args.towers) > 1 and any("liger" in v for v in args.variants):
        parser.error("--rounds runs each configuration's variants together, and Liger's patch changes transformers' "
                     "Llama for the rest of the process: with a Liger variant give one resolution and one tower")
    s = SMOKE if args.smoke else SHAPE
    device = torch.device("cuda")
    peak = matmul_tflops(device)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    # Liger's patch changes transformers' Llama for the rest of the process: its variants run after all others
    configs = [(r, t == "trained") for r in args.resolutions for t in args.towers]
    runs = sorted([(name, *config) for config in configs for name in args.variants], key=lambda run: "liger" in run[0])
    batches = {}
    for resolution in args.resolutions:
        generator = torch.Generator().manual_seed(resolution)
        patches = (resolution // s["tower"]["patch_size"]) ** 2
        rows = document_lengths(s, IMAGES_PER_ROW[resolution], patches + 16, generator)
        images = s["batch"] * IMAGES_PER_ROW[resolution]
        pixel_values = torch.randn(images, 3, resolution, resolution, generator=generator)
        # nanovision: a quarter of the patches (pixel shuffle r = 2); Llava: every patch
        batches[resolution] = dict(nanovision=vlm_batch(s, rows, patches // 4, pixel_values, device),
                                   llava=vlm_batch(s, rows, patches, pixel_values, device), images=images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    towers, results = {}, []

    def write():
        """After every measurement, so that a run stopped at a time limit keeps what it measured."""
        out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                       matmul_tflops=peak, shape=s, images_per_row=IMAGES_PER_ROW,
                                       kernels=describe_backends(), tower_alone=towers, variants=results),
                                  indent=2))

    if args.tower_alone:
        for resolution in args.resolutions:
            pixel_values = batches[resolution]["nanovision"]["pixel_values"]
            towers[resolution] = tower_alone(s, resolution, pixel_values)
            print(f"{resolution}px vision tower alone, {len(pixel_values)} images (ms, eager): " + "; ".join(
                f"{family} trained {t['trained_ms']:.1f}, frozen {t['frozen_ms']:.1f}"
                for family, t in towers[resolution].items()), flush=True)
            write()
    # One group at a time is alive: with --rounds, a configuration's variants, timed in turn each round
    groups = [[run] for run in runs] if args.rounds == 1 else [
        [run for run in runs if run[1:] == config] for config in configs]
    for group in groups:
        live = []
        for name, resolution, trained in group:
            b = batches[resolution]
            try:
                row, objects = start_variant(name, s, resolution, trained, device,
                                             b["llava" if "llava" in name else "nanovision"], b["images"], args.steps,
                                             args.warmup, args.profile, held_by_others(live))
                live.append((row, objects, trained))
            except Exception as error:  # noqa: BLE001  one variant that breaks is reported; the others still run
                row = dict(variant=name, resolution=resolution, tower="trained" if trained else "frozen",
                           error=repr(error)[:300])
                gc.collect()
                torch.cuda.empty_cache()
            results.append(row)
            if "error" in row:
                print(f"{resolution}px tower {row['tower']:7s} {name:48s} failed: {row['error']}", flush=True)
            else:
                print(f"{resolution}px tower {row['tower']:7s} {name:48s} {row['step_ms']:7.1f} ms "
                      f"{row['images_per_s']:7.0f} img/s {row['tokens_per_s']:8.0f} tok/s peak {row['peak_gib']:5.1f} "
                      f"GiB (wall {row['wall_s']:.0f} s{', compile failed: eager' if 'compile_error' in row else ''})",
                      flush=True)
            add_ratios(results)
            write()
        for round_index in range(1, args.rounds):
            for row, (_, runner, inputs), _ in live:
                seconds, peak_gib, loss, _ = time_steps(runner, inputs, None, args.steps, args.warmup)
                add_round(row, seconds, peak_gib - held_by_others(live, row), loss)
            add_ratios(results)
            write()
            print(f"round {round_index + 1}: " + "; ".join(
                f"{row['variant']} {row['round_step_ms'][-1]:.1f} ms" for row, _, _ in live), flush=True)
        while live:
            row, objects, trained = live.pop(0)
            finish_variant(row, objects, trained, args.profile)
            write()
        release()
    print(f"\n{'res':>4} {'tower':7} {'variant':48} {'step ms':>8} {'img/s':>7} {'tok/s':>8} {'GiB':>5} "
          f"{'x llava':>7} {'mem x':>6}")
    for row in (r for r in results if "error" not in r):
        print(f"{row['resolution']:4d} {row['tower']:7} {row['variant']:48} {row['step_ms']:8.1f} "
              f"{row['images_per_s']:7.0f} {row['tokens_per_s']:8.0f} {row['peak_gib']:5.1f} "
              f"{row.get('speed_vs_llava', float('nan')):7.2f} {row.get('memory_vs_llava', float('nan')):6.2f}")
        if len(row["round_step_ms"]) > 1:
            print("      rounds (ms): " + ", ".join(f"{ms:.1f}" for ms in row["round_step_ms"]) + (
                "; x llava: " + ", ".join(f"{x:.3f}" for x in row["round_speed_vs_llava"])
                if "round_speed_vs_llava" in row else ""))
        if "eager_parts_ms" in row:
            print("      eager parts (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in row["eager_parts_ms"].items())
                  + f"; eager step {row['eager_step_ms']:.1f}")
        if row.get("profile"):
            print("      top kernels (ms a step): " + "; ".join(f"{k['kernel'][:40]} {k['ms']:.2f}"
                                                           for k in row["profile"]["top"][:8]))
        if "compile_error" in row:
            print(f"      compile failed, timed eager: {row['compile_error'][:160]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
