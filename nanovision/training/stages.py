"""The three training stages on the HF Trainer: `base` (text LM pretraining), `vision` (connector alignment on
image-caption pairs, vision tower and LM frozen) and `sft` (multimodal chat SFT)."""

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    SiglipVisionConfig,
    TrainingArguments,
)

from .. import presets
from ..configuration_nanovision import NanoVisionConfig
from ..kernels import VARLEN_ATTENTION
from ..modeling_nanovision import NanoVisionForConditionalGeneration
from ..processing_nanovision import NanoVisionImageProcessor, NanoVisionProcessor
from ..tokenizer import train_tokenizer
from .collator import PackedDataCollator
from .data import builtin_dataset, load_stage_dataset, tokenize_for_stage
from .dataset_packing import pack_dataset
from .tower_pretraining import pretrain_vision_tower
from .trainer import NanoVisionTrainer, push_folder_to_hub, write_model_card

logger = logging.getLogger("nanovision")

STAGES = ("base", "vision", "sft")
PARTS = ("vision_tower", "connector", "language_model")
DEFAULT_TRAIN_MODULES = {"base": "language_model", "vision": "connector", "sft": "vision_tower,connector,language_model"}


@dataclass
class StageArguments:
    stage: str = field(metadata={"help": "base | vision | sft"})
    output_dir: str = field(metadata={"help": "Trainer checkpoints go here; the exported model goes to <output_dir>/final"})
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
    tower_pretrain_steps: int = field(default=0, metadata={"help": "vision stage: first pretrain the vision tower and "
                                                                   "connector this many steps on caption-word "
                                                                   "classification (training/tower_pretraining.py)"})
    tower_pretrain_phrases: bool = field(default=False, metadata={
        "help": "tower pretraining: also match each caption phrase (split at commas and 'and') to the image where "
                "one token shows all of its words, which binds colour, shape and place in one token"})
    builtin_caption_turn: bool = field(default=False, metadata={
        "help": "sft stage, built-in data: end each training conversation with 'Describe the image.' and the "
                "caption"})
    tower_pretrain_batch_size: int = 64
    tower_pretrain_lr: float = 1e-3
    train_modules: str | None = field(default=None, metadata={"help": "comma list of vision_tower,connector,"
                                                                     "language_model (default depends on the stage)"})
    device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    pack_max_length: int = 2048
    max_steps: int = -1
    num_train_epochs: float = 1.0
    learning_rate: float = 3e-3
    lm_lr: float | None = field(default=None, metadata={"help": "language model learning rate (default: "
                                                               "--learning_rate)"})
    connector_lr: float | None = None
    vision_lr: float | None = None
    warmup: float = field(default=0.05, metadata={"help": "warmup steps, or a fraction of the run if < 1"})
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "an HF Trainer optimizer name, or 'muon': Muon (torch.optim.Muon's update, training/muon.py) for the "
                "language model's hidden matrices (its decoder layers' 2D weights, at --muon_lr) and fused AdamW for "
                "the rest (embeddings, LM head, norms, connector, vision tower), as nanochat trains"})
    muon_lr: float = field(default=0.02, metadata={"help": "--optim muon: the hidden matrices' learning rate "
                                                           "(nanochat's default)"})
    attn_implementation: str = "sdpa"
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on a GPU that has bf16; on a "
                                                              "CPU with AVX512-BF16 or AMX it is worth turning on)"})
    use_fused_kernels: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    peak_tflops: float | None = field(default=None, metadata={"help": "bf16 peak for MFU (default: from the GPU name)"})
    seed: int = 0
    num_proc: int | None = None

    def __post_init__(self):
        if self.block not in ("llama", "nanochat"):
            raise ValueError(f"--block must be 'llama' or 'nanochat', got {self.block!r}.")
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {list(STAGES)}, got {self.stage!r}.")
        modules = self.train_modules or DEFAULT_TRAIN_MODULES[self.stage]
        unknown = [part for part in modules.split(",") if part not in PARTS]
        if unknown:
            raise ValueError(f"--train_modules takes a comma list of {list(PARTS)}, got unknown {unknown}.")
        if self.stage == "base" and modules != "language_model":
            raise ValueError("--train_modules: the base stage trains a text model, only 'language_model' applies.")
        self.train_modules = modules
        if self.builtin_turns != 1 and (self.stage != "sft" or self.dataset != "builtin"):
            raise ValueError("--builtin_turns applies to the sft stage on the built-in data (--dataset builtin) only.")
        if self.builtin_turns < 1:
            raise ValueError(f"--builtin_turns must be >= 1, got {self.builtin_turns}.")
        if self.builtin_caption_turn and (self.stage != "sft" or self.dataset != "builtin"):
            raise ValueError("--builtin_caption_turn applies to the sft stage on the built-in data (--dataset builtin) "
                             "only.")
        if self.tower_pretrain_steps and self.stage != "vision":
            raise ValueError("--tower_pretrain_steps applies to the vision stage (image-caption pairs) only.")
        if self.tower_pretrain_phrases and not self.tower_pretrain_steps:
            raise ValueError("--tower_pretrain_phrases changes the tower pretraining: also set --tower_pretrain_steps.")
        if self.connector_position_embedding and self.stage != "vision":
            raise ValueError("--connector_position_embedding shapes a new VLM, which the vision stage builds; later "
                             "stages keep the checkpoint's setting.")
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/nanovision-d4).")


def load_tokenizer(args: StageArguments, dataset):
    if args.stage != "base" or args.tokenizer or args.model:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    return train_tokenizer(dataset["text"], vocab_size=args.vocab_size, model_max_length=args.pack_max_length)


def build_model(args: StageArguments, tokenizer):
    kwargs = dict(attn_implementation=args.attn_implementation)
    if args.stage == "base":
        if args.model:
            return AutoModelForCausalLM.from_pretrained(args.model, use_fused_kernels=args.use_fused_kernels, **kwargs)
        preset = presets.text_config if args.block == "llama" else presets.nanochat_config
        config = preset(
            depth=args.depth, head_dim=args.head_dim, vocab_size=len(tokenizer),
            max_position_embeddings=args.pack_max_length, use_fused_kernels=args.use_fused_kernels,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return AutoModelForCausalLM.from_config(config, **kwargs)
    start = AutoConfig.from_pretrained(args.model)
    if isinstance(start, NanoVisionConfig):
        if args.connector_position_embedding and not start.connector_position_embedding:
            raise ValueError(f"--connector_position_embedding: {args.model} is a VLM built without it; the flag shapes "
                             "a new VLM (start the vision stage from the base stage's text model).")
        start.text_config.use_fused_kernels = args.use_fused_kernels
        return AutoModelForImageTextToText.from_pretrained(args.model, config=start, **kwargs)
    if args.stage == "sft":
        raise ValueError(f"--model {args.model} is a text model; the sft stage starts from a VLM (run --stage vision).")
    connector = dict(connector_type=args.connector_type, pixel_shuffle_factor=args.pixel_shuffle_factor,
                     connector_position_embedding=args.connector_position_embedding,
                     image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    if args.vision_model:
        model = NanoVisionForConditionalGeneration.from_pretrained_components(args.model, args.vision_model, **connector)
    else:
        vision_config = SiglipVisionConfig(
            image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_hidden_size,
            intermediate_size=4 * args.vision_hidden_size, num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_heads,
        )
        model = NanoVisionForConditionalGeneration.from_text_model(AutoModelForCausalLM.from_pretrained(args.model),
                                                                   vision_config, **connector)
    model.set_attn_implementation(args.attn_implementation)
    if args.use_fused_kernels:  # recorded in the config, so the saved checkpoint loads with them too
        from ..kernels import apply_fused_kernels

        model.config.text_config.use_fused_kernels = True
        apply_fused_kernels(model)
    return model


def build_processor(model, tokenizer):
    vision = model.config.vision_config
    return NanoVisionProcessor(NanoVisionImageProcessor(size={"height": vision.image_size, "width": vision.image_size}),
                               tokenizer, num_image_tokens=model.config.num_image_tokens)


def run_stage(args: StageArguments, callbacks=None) -> Path:
    """Train one stage and export `<output_dir>/final`: a `save_pretrained` folder with the tokenizer, the processor
    (vision stages), remote-code files, generation config and a model card. Returns that folder."""
    torch.manual_seed(args.seed)
    if args.dataset == "builtin":
        dataset = builtin_dataset(args.stage, args.builtin_train_size, max(1, args.builtin_train_size // 10),
                                  args.image_size, seed=args.seed, turns=args.builtin_turns,
                                  caption_turn=args.builtin_caption_turn)["train"]
    else:
        dataset = load_stage_dataset(args.dataset, args.stage, args.dataset_split)
    tokenizer = load_tokenizer(args, dataset)
    model = build_model(args, tokenizer)
    is_vlm = isinstance(model, NanoVisionForConditionalGeneration)
    processor = build_processor(model, tokenizer) if is_vlm else None
    if args.tower_pretrain_steps:
        pretrain_vision_tower(model, processor, dataset, args.tower_pretrain_steps, args.output_dir,
                              batch_size=args.tower_pretrain_batch_size,
                              learning_rate=args.tower_pretrain_lr, seed=args.seed, bf16=args.bf16,
                              phrases=args.tower_pretrain_phrases)
    if is_vlm:
        wanted = set(args.train_modules.split(","))
        model.set_trainable(**{part: part in wanted for part in PARTS})
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)

    tokenized = tokenize_for_stage(dataset, args.stage, tokenizer,
                                   model.config.num_image_tokens if is_vlm else None, args.num_proc)
    image_ids = {}
    if is_vlm:
        image_ids = dict(image_token_id=processor.image_token_id, image_start_token_id=processor.image_start_token_id,
                         image_end_token_id=processor.image_end_token_id, num_image_tokens=processor.num_image_tokens)
    packed, stats = pack_dataset(tokenized, args.pack_max_length, args.num_proc, **image_ids)
    collator = PackedDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.pack_max_length,
                                  image_processor=processor.image_processor if is_vlm else None,
                                  return_flash_attn_kwargs=args.attn_implementation.startswith("flash")
                                  or args.attn_implementation == VARLEN_ATTENTION)

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        optim="adamw_torch_fused" if args.optim == "muon" else args.optim, bf16=args.bf16,
        torch_compile=args.compile, gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        include_num_input_tokens_seen="all", remove_unused_columns=False, dataloader_num_workers=0,
        report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
    )
    part_lrs = {part: lr for part, lr in (("language_model", args.lm_lr), ("connector", args.connector_lr),
                                          ("vision_tower", args.vision_lr)) if lr is not None}
    trainer = NanoVisionTrainer(
        model=model, args=training_args, train_dataset=packed, data_collator=collator,
        processing_class=processor or tokenizer, part_learning_rates=part_lrs,
        muon_lr=args.muon_lr if args.optim == "muon" else None,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, seq_len=args.pack_max_length,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    final = Path(args.output_dir) / "final"
    trainer.save_model(final)  # on every rank: gathering FSDP-sharded weights is collective
    if trainer.args.should_save:  # the rest once, from the main process (an upload per rank would repeat it)
        (processor or tokenizer).save_pretrained(final)
        settings = {"stage": args.stage, "train_modules": args.train_modules, "steps": trainer.state.global_step,
                    "train_loss": round(result.training_loss, 4), "packing": stats.summary(),
                    **{key: value for key, value in asdict(args).items() if key in (
                        "device_batch_size", "gradient_accumulation_steps", "pack_max_length", "learning_rate",
                        "lm_lr", "connector_lr", "vision_lr", "optim", "attn_implementation", "bf16",
                        "use_fused_kernels")}}
        if args.optim == "muon":
            settings["muon_lr"] = args.muon_lr
        (final / "training_settings.json").write_text(json.dumps(settings, indent=2))
        write_model_card(final, base_model=args.model, datasets=[args.dataset], stage=args.stage, settings=settings)
        if args.push_to_hub:
            push_folder_to_hub(final, args.hub_model_id)
        logger.info("%s stage done: %s", args.stage, final)
    trainer.accelerator.wait_for_everyone()  # every rank may read the folder next (e.g. the next stage)
    return final
