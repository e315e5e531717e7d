"""The options of a training stage: nanovision's own (`StageArguments`) and the HF Trainer's
(`NanoVisionTrainingArguments`, `TrainingArguments` with nanovision's defaults), parsed together by
`argument_parser()` as transformers' example scripts do; `validate_arguments` checks both before any data is read
or any model is built."""

import math
import os
from dataclasses import dataclass, field

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..configuration_nanovision import NanoVisionConfig, NanoVisionTextConfig

STAGES = ("base", "vision", "sft")
PARTS = ("vision_tower", "connector", "language_model")
DEFAULT_TRAIN_MODULES = {"base": "language_model", "vision": "connector", "sft": "vision_tower,connector,language_model"}
SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")


@dataclass
class StageArguments:
    """What a nanovision stage adds to the Trainer's options: the stage, its data, the model to start from (or the
    sizes of a new one), the learning rate per model part and the vision-tower pretraining."""

    _argument_group_name = "nanovision stage"

    stage: str = field(metadata={"help": "base | vision | sft"})
    dataset: str = field(default="builtin", metadata={"help": "'builtin' (synthetic shapes), a Hub name, a local "
                                                              "dataset folder or a parquet/json(l)/csv file"})
    dataset_split: str = "train"
    model: str | None = field(default=None, metadata={"help": "checkpoint to start from: for base, a text model "
                                                             "(default: new model from --depth); for vision, the base "
                                                             "stage's text model or a VLM; for sft, a VLM"})
    vision_model: str | None = field(default=None, metadata={"help": "vision stage: a SigLIP checkpoint for the tower "
                                                                    "(default: a new tower from the --vision_* sizes)"})
    tokenizer: str | None = field(default=None, metadata={"help": "base stage: tokenizer to use (default: train one "
                                                                 "on the dataset)"})
    vocab_size: int = 1024
    block: str = field(default="llama", metadata={"help": "new base model: 'llama' (presets.text_config) or "
                                                          "'nanochat' (presets.nanochat_config)"})
    depth: int = 4
    head_dim: int = 64
    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    connector_type: str = "pixel_shuffle"
    pixel_shuffle_factor: int = 2
    connector_position_embedding: bool = field(default=False, metadata={
        "help": "vision stage, new VLM: add a learned embedding per image-token position to the connector's output "
                "(NanoVisionConfig.connector_position_embedding)"})
    builtin_train_size: int = 4000
    builtin_turns: int = field(default=1, metadata={"help": "sft stage, built-in data: questions per image in each "
                                                            "training conversation (held-out questions stay one)"})
    builtin_caption_turn: bool = field(default=False, metadata={
        "help": "sft stage, built-in data: end each training conversation with 'Describe the image.' and the "
                "caption"})
    tower_pretrain_steps: int = field(default=0, metadata={"help": "vision stage: first pretrain the vision tower and "
                                                                   "connector this many steps on caption-word "
                                                                   "classification (training/tower_pretraining.py)"})
    tower_pretrain_phrases: bool = field(default=False, metadata={
        "help": "tower pretraining: also match each caption phrase (split at commas and 'and') to the image where "
                "one token shows all of its words, which binds colour, shape and place in one token"})
    tower_pretrain_batch_size: int = 64
    tower_pretrain_lr: float = 1e-3
    train_modules: str | None = field(default=None, metadata={"help": "comma list of vision_tower,connector,"
                                                                     "language_model (default depends on the stage)"})
    pack_max_length: int = field(default=2048, metadata={"help": "tokens per packed row; longer examples are "
                                                                 "truncated (the log says how many)"})
    lm_lr: float | None = field(default=None, metadata={"help": "language model learning rate (default: "
                                                               "--learning_rate)"})
    connector_lr: float | None = None
    vision_lr: float | None = None
    muon_lr: float = field(default=0.02, metadata={"help": "--optim muon: the hidden matrices' learning rate "
                                                           "(nanochat's default)"})
    attn_implementation: str = "sdpa"
    use_fused_kernels: bool = False
    peak_tflops: float | None = field(default=None, metadata={"help": "bf16 peak for MFU (default: from the GPU name)"})
    num_proc: int | None = None

    def __post_init__(self):
        if self.train_modules is None and self.stage in DEFAULT_TRAIN_MODULES:
            self.train_modules = DEFAULT_TRAIN_MODULES[self.stage]


@dataclass
class NanoVisionTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults nanovision's small models train well with (learning rate 3e-3, cosine
    schedule after a 5% warmup, one epoch, frequent logs and checkpoints, seed 0, bf16 where the GPU has it), the
    flag names nanovision had (`--device_batch_size`, `--warmup`, `--compile`), and `--optim muon`."""

    _argument_group_name = "HF Trainer (transformers.TrainingArguments, nanovision's defaults)"

    output_dir: str = field(metadata={"help": "Trainer checkpoints go here; the exported model goes to "
                                              "<output_dir>/final"})
    per_device_train_batch_size: int = field(default=8, metadata={"aliases": ["--device_batch_size"],
                                                                  "help": "packed rows per device and step"})
    num_train_epochs: float = 1.0
    learning_rate: float = 3e-3
    lr_scheduler_type: SchedulerType | str = "cosine"
    warmup_steps: float = field(default=0.05, metadata={"aliases": ["--warmup"],
                                                        "help": "warmup steps, or a fraction of the run if < 1"})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "an HF Trainer optimizer name, or 'muon': Muon (torch.optim.Muon's update, training/muon.py) for the "
                "language model's hidden matrices (its decoder layers' 2D weights, at --muon_lr) and fused AdamW for "
                "the rest (embeddings, LM head, norms, connector, vision tower), as nanochat trains"})
    bf16: bool | None = field(default=None, metadata={
        "nargs": "?", "const": True,
        "help": "bf16 autocast (default: on a GPU that has bf16; on a CPU with AVX512-BF16 or AMX it is worth turning "
                "on)"})
    torch_compile: bool = field(default=False, metadata={"aliases": ["--compile"], "help": "torch.compile the model"})
    logging_steps: float = 10
    save_steps: float = 200
    save_total_limit: int | None = 2
    push_to_hub: bool = field(default=False, metadata={
        "help": "upload the exported <output_dir>/final (weights, tokenizer, processor, remote code, model card) to "
                "--hub_model_id when the stage ends"})
    seed: int = 0
    # the packed rows' columns are the collator's input, not the model's forward arguments
    remove_unused_columns: bool = False
    include_num_input_tokens_seen: str | bool = True  # "all": the tokens/s and MFU logs count them
    # Set from `optim` and `push_to_hub`: the Trainer knows neither Muon nor nanovision's export folder, so it sees
    # `optim` AdamW (for what Muon does not take) and `push_to_hub` off (it would upload <output_dir> at each save).
    use_muon: bool = field(default=False, init=False, repr=False)
    push_final_to_hub: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.use_muon = self.optim == "muon"
        if self.use_muon:
            self.optim = "adamw_torch_fused"
        self.push_final_to_hub, self.push_to_hub = self.push_to_hub, False
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        self.use_cpu = self.use_cpu or not torch.cuda.is_available()
        super().__post_init__()


def argument_parser(prog: str | None = None) -> HfArgumentParser:
    """`parse_args_into_dataclasses(argv)` for a command line, `parse_dict(settings)` for Python: both return
    `(StageArguments, NanoVisionTrainingArguments)`."""
    return HfArgumentParser((StageArguments, NanoVisionTrainingArguments), prog=prog,
                            description="One nanovision training stage on the HF Trainer; the exported model is "
                                        "<output_dir>/final.")


def is_local_path(value: str) -> bool:
    """Whether a --model/--dataset/... value names a local path rather than a Hub repository: it exists, cannot be a
    repository id, or starts in a local folder (`out/final` where `out` exists)."""
    if os.path.exists(value):
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return os.path.isdir(value.split("/")[0])


def check_pretrained_folder(flag: str, value: str, expected_file: str = "config.json") -> bool:
    """Raise when `value` is meant as a local folder but is not one with `expected_file`; returns whether it is
    local (a Hub id is checked when it is downloaded)."""
    if not is_local_path(value):
        return False
    if not os.path.isdir(value):
        raise ValueError(f"{flag} {value}: no such folder. Give a folder written by save_pretrained (e.g. a stage's "
                         f"<output_dir>/final) or a Hub repository id.")
    if not os.path.exists(os.path.join(value, expected_file)):
        raise ValueError(f"{flag} {value}: the folder has no {expected_file}, so it is not a save_pretrained "
                         f"checkpoint. Give a stage's <output_dir>/final or a checkpoint-N folder.")
    return True


def _check_starting_models(args: StageArguments) -> None:
    if args.model:
        check_pretrained_folder("--model", args.model)
    if args.tokenizer:
        check_pretrained_folder("--tokenizer", args.tokenizer, "tokenizer_config.json")
    if args.vision_model:
        check_pretrained_folder("--vision_model", args.vision_model)
        vision = AutoConfig.from_pretrained(args.vision_model)
        if vision.model_type not in SIGLIP_MODEL_TYPES:
            raise ValueError(f"--vision_model {args.vision_model} holds a {vision.model_type!r} model, not a SigLIP "
                             f"vision tower: give a SiglipVisionModel or SiglipModel checkpoint. To continue from a "
                             f"nanovision VLM, pass it as --model instead.")
    if args.stage == "base" or not args.model:
        return
    start = AutoConfig.from_pretrained(args.model)
    if args.stage == "sft" and not isinstance(start, NanoVisionConfig):
        raise ValueError(f"--model {args.model} is a {start.model_type!r} model; the sft stage starts from a "
                         "nanovision VLM (the vision stage's <output_dir>/final).")
    if not isinstance(start, NanoVisionConfig | NanoVisionTextConfig):
        raise ValueError(f"--model {args.model} is a {start.model_type!r} model; the vision stage starts from a "
                         "nanovision text model (the base stage's <output_dir>/final) or a nanovision VLM.")
    if args.vision_model and isinstance(start, NanoVisionConfig):
        raise ValueError(f"--vision_model: --model {args.model} is already a VLM with its own vision tower; drop "
                         "--vision_model, or start from the base stage's text model.")
    if isinstance(start, NanoVisionConfig) and args.connector_position_embedding and \
            not start.connector_position_embedding:
        raise ValueError(f"--connector_position_embedding: {args.model} is a VLM built without it; the flag shapes a "
                         "new VLM (start the vision stage from the base stage's text model).")


def _check_numbers(args: StageArguments, training_args: NanoVisionTrainingArguments) -> None:
    learning_rates = {"learning_rate": training_args.learning_rate, "lm_lr": args.lm_lr,
                      "connector_lr": args.connector_lr, "vision_lr": args.vision_lr, "muon_lr": args.muon_lr,
                      "tower_pretrain_lr": args.tower_pretrain_lr}
    for name, value in learning_rates.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a positive number, got {value}.")
    at_least_one = {
        "device_batch_size / --per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "pack_max_length": args.pack_max_length, "builtin_train_size": args.builtin_train_size,
        "builtin_turns": args.builtin_turns, "tower_pretrain_batch_size": args.tower_pretrain_batch_size,
        "vocab_size": args.vocab_size, "depth": args.depth, "head_dim": args.head_dim, "image_size": args.image_size,
        "patch_size": args.patch_size, "vision_hidden_size": args.vision_hidden_size,
        "vision_layers": args.vision_layers, "vision_heads": args.vision_heads,
        "pixel_shuffle_factor": args.pixel_shuffle_factor, "save_total_limit": training_args.save_total_limit,
        "num_proc": args.num_proc,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    for name, value in {"logging_steps": training_args.logging_steps, "save_steps": training_args.save_steps,
                        "peak_tflops": args.peak_tflops}.items():
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}.")
    for name, value in {"tower_pretrain_steps": args.tower_pretrain_steps,
                        "weight_decay": training_args.weight_decay}.items():
        if not value >= 0:
            raise ValueError(f"--{name} must be 0 or more, got {value}.")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(f"--max_steps {training_args.max_steps} trains nothing: give a positive number of steps, or "
                         "-1 (the default) to train for --num_train_epochs.")
    if not (math.isfinite(training_args.num_train_epochs) and training_args.num_train_epochs > 0):
        raise ValueError(f"--num_train_epochs must be positive, got {training_args.num_train_epochs} (with it the "
                         "stage would export an untrained model); --max_steps N trains N steps instead.")


def _check_stage_options(args: StageArguments, training_args: NanoVisionTrainingArguments) -> None:
    if args.stage not in STAGES:
        raise ValueError(f"--stage must be one of {list(STAGES)}, got {args.stage!r}.")
    if args.block not in ("llama", "nanochat"):
        raise ValueError(f"--block must be 'llama' or 'nanochat', got {args.block!r}.")
    unknown = [part for part in args.train_modules.split(",") if part not in PARTS]
    if unknown:
        raise ValueError(f"--train_modules takes a comma list of {list(PARTS)}, got unknown {unknown}.")
    if args.stage == "base" and args.train_modules != "language_model":
        raise ValueError("--train_modules: the base stage trains a text model, only 'language_model' applies.")
    builtin_sft = args.stage == "sft" and args.dataset == "builtin"
    if args.builtin_turns != 1 and not builtin_sft:
        raise ValueError("--builtin_turns applies to the sft stage on the built-in data (--dataset builtin) only.")
    if args.builtin_caption_turn and not builtin_sft:
        raise ValueError("--builtin_caption_turn applies to the sft stage on the built-in data (--dataset builtin) "
                         "only.")
    if args.tower_pretrain_steps and args.stage != "vision":
        raise ValueError("--tower_pretrain_steps applies to the vision stage (image-caption pairs) only.")
    if args.tower_pretrain_phrases and not args.tower_pretrain_steps:
        raise ValueError("--tower_pretrain_phrases changes the tower pretraining: also set --tower_pretrain_steps.")
    if args.connector_position_embedding and args.stage != "vision":
        raise ValueError("--connector_position_embedding shapes a new VLM, which the vision stage builds; later "
                         "stages keep the checkpoint's setting.")
    if training_args.push_final_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/nanovision-d4).")
    if args.stage != "base" and not args.model:
        raise ValueError(f"--stage {args.stage} needs --model: the vision stage starts from a text model (the base "
                         "stage's <output_dir>/final) or a VLM, the sft stage from a VLM (the vision stage's).")


def validate_arguments(args: StageArguments, training_args: NanoVisionTrainingArguments) -> None:
    """Every check of a stage's options, run before any work: values in range, flags that apply to the stage, and
    the folders they name (a checkpoint to start from or resume, a SigLIP tower, a local dataset). Raises a
    ValueError that names the flag and the fix."""
    _check_numbers(args, training_args)
    _check_stage_options(args, training_args)
    if args.dataset != "builtin" and is_local_path(args.dataset) and not os.path.exists(args.dataset):
        raise ValueError(f"--dataset {args.dataset}: no such file or folder. Give 'builtin', a Hub dataset name, a "
                         "dataset folder or a parquet/json(l)/csv file.")
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint and not os.path.exists(os.path.join(checkpoint, "trainer_state.json")):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: not a Trainer checkpoint (no trainer_state.json "
                         "there). Give one of <output_dir>/checkpoint-N.")
    _check_starting_models(args)
