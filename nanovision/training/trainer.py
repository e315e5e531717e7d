"""HF Trainer glue: per-module learning rates, a non-finite-loss guard, throughput/MFU logging, saving from FSDP, the
exported checkpoint folder with its model card, and the Hub upload."""

import logging
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .muon import Muon, MuonWithAdamW

logger = logging.getLogger("nanovision")

# Dense bf16 tensor-core peak per GPU, FLOP/s, from the vendors' data sheets. MFU is reported against this (or
# against --peak_tflops): "H100" means the SXM part.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                   "RTX 4090": 165e12}


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls there run well above the fp32 rate (benchmarks/RESULTS.md has the figures)."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def default_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of the language model (forward + backward): 6 per non-embedding parameter plus
    causal attention (half of nanochat's 12 L H D T, since a causal token attends on average to half the
    sequence). The vision tower is not counted. benchmarks/train_step.py reports TFLOP/s and MFU with this."""
    config = model.config.get_text_config()
    language_params = sum(p.numel() for name, p in model.named_parameters()
                          if "vision_tower" not in name and "embed_tokens" not in name)
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * language_params + attention


class NonFiniteLossError(RuntimeError):
    pass


class NanoVisionTrainer(Trainer):
    """`Trainer` with a learning rate per model part (vision tower / connector / language model), a guard that
    stops on a NaN/inf loss before the optimizer step (so no checkpoint with broken weights is ever written),
    tokens/s + MFU in the logs, and FSDP saves that load with plain `from_pretrained`."""

    def __init__(self, *args, part_learning_rates: dict[str, float] | None = None, peak_flops: float | None = None,
                 seq_len: int = 2048, muon_lr: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.part_learning_rates = part_learning_rates or {}
        self.muon_lr = muon_lr
        self.peak_flops = peak_flops or default_peak_flops()
        self.flops_per_token = flops_per_token(self.model, seq_len)
        self._throughput_mark = None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model or self.model
        parts = getattr(model, "trainable_parts", {"language_model": [model]})
        hidden_matrices = self._muon_matrices(model) if self.muon_lr is not None else set()
        groups, muon_groups = [], []
        for part, modules in parts.items():
            params = [p for module in modules for p in module.parameters() if p.requires_grad]
            lr = self.part_learning_rates.get(part, self.args.learning_rate)
            muon_groups.append({"params": [p for p in params if id(p) in hidden_matrices], "lr": self.muon_lr,
                                "weight_decay": self.args.weight_decay, "name": f"{part}.muon"})
            params = [p for p in params if id(p) not in hidden_matrices]
            # no weight decay on vectors: norms, biases, perceiver queries are 1D or would be shrunk pointlessly
            groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr,
                           "weight_decay": self.args.weight_decay, "name": part})
            groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0,
                           "name": f"{part}.no_decay"})
        groups = [group for group in groups if group["params"]]
        muon_groups = [group for group in muon_groups if group["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if muon_groups:
            # bf16 Newton-Schulz (torch's choice) where bf16 is fast, fp32 on CPUs without bf16 units
            fast_bf16 = self.args.device.type != "cpu" or cpu_has_fast_bf16()
            muon = Muon(muon_groups, newton_schulz_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
            self.optimizer = MuonWithAdamW(muon, self.optimizer)
        for group in muon_groups + groups:
            logger.info("optimizer group %s: %d tensors, lr %.2e", group["name"], len(group["params"]), group["lr"])
        return self.optimizer

    def _muon_matrices(self, model) -> set[int]:
        """ids of the decoder layers' 2D weights, the hidden matrices Muon is for (embeddings and the LM head are
        lookups and a classifier: AdamW keeps them, as in nanochat)."""
        if self.is_fsdp_enabled:
            raise ValueError("--optim muon orthogonalises whole weight matrices, which FSDP shards across processes: "
                             "train with DDP (no FSDP config) or use an AdamW --optim.")
        return {id(p) for p in model.get_decoder().layers.parameters() if p.ndim == 2}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            checkpoints = sorted(Path(self.args.output_dir).glob("checkpoint-*"),
                                 key=lambda path: int(path.name.split("-")[-1]))
            last = checkpoints[-1] if checkpoints else "none saved yet"
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {self.state.global_step + 1}; the run stopped before "
                f"the optimizer step. Last good checkpoint: {last}. Lower the learning rate or check the data, then "
                f"resume with --resume_from_checkpoint."
            )
        return loss

    def save_model(self, output_dir=None, _internal_call=False):
        # An export (not a checkpoint) under FSDP always gets the gathered full weights: Trainer gathers them only with
        # FULL_STATE_DICT and writes none here with SHARDED_STATE_DICT. Collective: every rank calls it.
        if not self.is_fsdp_enabled or _internal_call:
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    def _save(self, output_dir=None, state_dict=None):
        # FSDP2 turns the model into an instance of a generated FSDP<Name>(FSDPModule, <Name>) class; saved as such,
        # save_pretrained would copy torch's FSDP source files as the remote code and name FSDP<Name> in
        # config.json's auto_map. Save it as <Name> (the state dict is already gathered).
        model, saved_class = self.model, type(self.model)
        if self.is_fsdp_enabled:
            from torch.distributed.fsdp import FSDPModule

            model.__class__ = next(cls for cls in saved_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = saved_class

    def log(self, logs, *args, **kwargs):
        now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
        if self._throughput_mark is not None and "loss" in logs:
            then, tokens_then = self._throughput_mark
            tokens_per_second = (tokens - tokens_then) / max(now - then, 1e-9)
            logs["tokens_per_second"] = round(tokens_per_second, 1)
            if self.peak_flops:
                world = self.args.world_size
                logs["mfu"] = round(tokens_per_second * self.flops_per_token / (self.peak_flops * world), 4)
        if "loss" in logs or self._throughput_mark is None:
            self._throughput_mark = (now, tokens)
        super().log(logs, *args, **kwargs)


def write_model_card(folder: Path, *, base_model: str | None, datasets: list[str], stage: str,
                     settings: dict, eval_results: dict[str, float] | None = None) -> None:
    """README.md with Hub metadata (library, pipeline, base model, datasets, eval results) and the training
    settings."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [EvalResult(task_type="image-text-to-text", dataset_type=datasets[0] if datasets else "unknown",
                          dataset_name=datasets[0] if datasets else "unknown", metric_type="accuracy",
                          metric_name=name, metric_value=value)
               for name, value in (eval_results or {}).items()]
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text" if stage != "base" else "text-generation",
        base_model=base_model, datasets=datasets or None, tags=["nanovision", f"nanovision-{stage}"],
        model_name=folder.name, eval_results=results or None,
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    evals = "\n".join(f"| {key} | {value:.4f} |" for key, value in (eval_results or {}).items()) or "| - | - |"
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {folder.name}\n\n"
        f"A nanovision model after the `{stage}` stage. Load it with `trust_remote_code=True` where nanovision "
        f"is not installed.\n\n## Training settings\n\n| setting | value |\n|---|---|\n{rows}\n\n"
        f"## Evaluation\n\n| metric | value |\n|---|---|\n{evals}\n"
    )
    ModelCard(content).save(folder / "README.md")


def push_folder_to_hub(folder: Path, repo_id: str, private: bool = False):
    """Upload exactly the exported folder (weights, config, tokenizer, processor, remote code, model card)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="nanovision checkpoint")




class StageReportCallback(TrainerCallback):
    """Says what a stage trains and how long it took: its step count and precision when training begins, its
    training time when it ends (on the main process)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if state.is_world_process_zero:
            precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32"
            print(f"[{self.stage}] training {state.max_steps} steps in {precision}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"[{self.stage}] trained {state.global_step} steps in {time.perf_counter() - self.started:.0f} s",
                  flush=True)
