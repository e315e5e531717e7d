"""`nanovision quickstart`: the whole pipeline on the built-in shapes data, sized for a 2-core CPU: tokenizer,
base -> vision -> sft on a tiny model with packing, reload with the Auto classes, held-out accuracy."""

import json
import sys
import time
from pathlib import Path

import torch

from .arguments import argument_parser
from .evaluate import evaluate_checkpoint
from .stages import run_stage
from .trainer import StageReportCallback, cpu_has_fast_bf16, write_model_card

# Each stage's settings; the model: nanochat's block, 4 layers of 256 (4 heads of 64) + a 2-layer SigLIP tower on
# 64x64 images (8px patches, pixel shuffle 2 -> 16 image tokens). nanochat's norm after the embedding also
# normalises the image embeddings, which keeps the connector's output on the text embeddings' scale.
# Why each setting (the measurements: benchmarks/RESULTS.md, "Quickstart accuracy" and the Muon seed sweeps):
# - the vision stage first pretrains the new tower on caption words (training/tower_pretraining.py) and SFT keeps it
#   frozen: without that the tiny LM never learns to read the image in this budget; 1200 steps rather than 300,
#   because the tower learns to tell the shapes apart much later than the colours;
# - the pretraining also matches whole caption phrases to single tokens, and the connector adds a learned embedding
#   per grid cell: together (either alone does little) they lift the questions that bind colour, shape and place
#   ("What color is the shape on the left?", "Where is the red square?");
# - SFT conversations ask three questions per image and end with the caption (held-out ones ask one question);
#   SFT takes micro-batches of 4 packed rows over three epochs: more updates per epoch buy more than more epochs;
# - SFT trains the language model's hidden matrices with Muon (AdamW for embeddings, head, norms and connector) at
#   constant learning rates: with AdamW, whether SFT learned to look a place's attribute up among the image tokens
#   was decided by the seed; with Muon at a constant rate it was learned on every seed tried;
# - attention runs per packed document (nanovision_varlen), not over sdpa's block-diagonal mask, which computes
#   every cross-document pair;
# - bf16 autocast on CPUs that compute it natively (AVX512-BF16 / AMX), fp32 on the others.
STAGES = {
    "base": dict(builtin_train_size=4000, num_train_epochs=2, learning_rate=3e-3, block="nanochat"),
    "vision": dict(builtin_train_size=4000, num_train_epochs=1, learning_rate=3e-3, tower_pretrain_steps=1200,
                   tower_pretrain_phrases=True, connector_position_embedding=True),
    "sft": dict(builtin_train_size=8000, builtin_turns=3, builtin_caption_turn=True, num_train_epochs=3,
                per_device_train_batch_size=4, learning_rate=2e-3, optim="muon", muon_lr=0.005,
                lr_scheduler_type="constant", warmup_steps=0, train_modules="connector,language_model"),
}
DEFAULTS = dict(pack_max_length=512, per_device_train_batch_size=8, logging_steps=20, save_steps=10_000,
                attn_implementation="nanovision_varlen")


STAGE_TITLES = {"base": "text language model pretraining", "vision": "vision tower pretraining and connector "
                "alignment on captions", "sft": "visual question answering SFT"}


def quiet_progress_bars() -> None:
    """For output piped to a file: no tqdm bars (their carriage-return redraws flood a log). The Trainer's own bar
    goes with `disable_tqdm`, after which it prints each log as a plain line (PrinterCallback)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def run(output_dir="outputs/quickstart", seed=0, num_test=400, **overrides) -> dict:
    """base -> vision -> sft, each announced before it starts and timed, then the held-out accuracy. ``overrides``
    apply to every stage (names of `StageArguments` or `TrainingArguments` fields)."""
    start = time.time()
    piped = not (sys.stdout.isatty() and sys.stderr.isatty())
    if piped:
        quiet_progress_bars()
    output_dir = Path(output_dir)
    previous = None
    on_gpu = torch.cuda.is_available()
    reason = ""
    if "bf16" in overrides:
        bf16 = overrides.pop("bf16")
    elif on_gpu:
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = cpu_has_fast_bf16()
        reason = " (this CPU computes bf16 natively)" if bf16 else " (this CPU has no native bf16)"
    print(f"nanovision quickstart on the {'GPU' if on_gpu else 'CPU'}, precision: "
          f"{'bf16 autocast' if bf16 else 'fp32'}{reason}", flush=True)
    for number, (stage, settings) in enumerate(STAGES.items(), 1):
        arguments = argument_parser().parse_dict({"stage": stage, "output_dir": str(output_dir / stage),
                                                  "model": previous, "seed": seed, **DEFAULTS, "bf16": bf16,
                                                  "disable_tqdm": piped, **settings, **overrides})
        print(f"== stage {number}/{len(STAGES)}: {stage} ({STAGE_TITLES[stage]}) ==", flush=True)
        stage_start = time.time()
        previous = str(run_stage(*arguments, callbacks=[StageReportCallback(stage)]))
        print(f"[{stage}] stage done in {time.time() - stage_start:.0f} s ({time.time() - start:.0f} s in all): "
              f"{previous}", flush=True)
    print("== evaluation: held-out questions ==", flush=True)
    scores = evaluate_checkpoint(previous, num_test=num_test, seed=seed)
    settings = json.loads((Path(previous) / "training_settings.json").read_text())
    write_model_card(Path(previous), base_model=str(output_dir / "vision" / "final"), datasets=["builtin"],
                     stage="sft", settings=settings, eval_results={f"{kind} accuracy": value for kind, value in
                                                                   scores.items() if kind != "n"})
    print(f"checkpoint: {previous} ({time.time() - start:.0f} s)", flush=True)
    return scores
