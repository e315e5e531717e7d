"""The three training stages on the HF Trainer: `base` (text LM pretraining), `vision` (connector alignment on
image-caption pairs, vision tower and LM frozen) and `sft` (multimodal chat SFT)."""

import atexit
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    SiglipVisionConfig,
)

from .. import presets
from ..configuration_nanovision import NanoVisionConfig
from ..kernels import VARLEN_ATTENTION
from ..modeling_nanovision import NanoVisionForConditionalGeneration
from ..processing_nanovision import NanoVisionImageProcessor, NanoVisionProcessor
from ..tokenizer import train_tokenizer
from .arguments import PARTS, NanoVisionTrainingArguments, StageArguments, validate_arguments
from .collator import PackedDataCollator
from .data import builtin_dataset, load_stage_dataset, tokenize_for_stage
from .dataset_packing import pack_dataset
from .tower_pretraining import pretrain_vision_tower
from .trainer import NanoVisionTrainer, push_folder_to_hub, write_model_card

logger = logging.getLogger("nanovision")


def load_tokenizer(args: StageArguments, dataset, checkpoint: str | None = None):
    """The starting model's tokenizer (or --tokenizer); for a new base model one trained on the dataset. A resumed
    run takes its checkpoint's: the weights there learned those token ids, which a tokenizer trained on other data
    would change."""
    if checkpoint:
        if not os.path.exists(os.path.join(checkpoint, "tokenizer_config.json")):
            raise ValueError(f"--resume_from_checkpoint {checkpoint} holds no tokenizer, so the run cannot go on with "
                             "the token ids its weights learned. Resume from a checkpoint that nanovision wrote.")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        requested = args.tokenizer or args.model
        if requested and AutoTokenizer.from_pretrained(requested).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--resume_from_checkpoint {checkpoint} was trained with another tokenizer than "
                             f"{requested}'s: resume with the --model/--tokenizer of that run.")
        return tokenizer
    if args.stage != "base" or args.tokenizer or args.model:
        return AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    return train_tokenizer(dataset["text"], vocab_size=args.vocab_size, model_max_length=args.pack_max_length)


def from_pretrained_complete(auto_class, path: str, **kwargs):
    """`from_pretrained` that refuses a checkpoint lacking weights the model needs (transformers initialises them at
    random and only logs it)."""
    model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"--model {path} lacks {len(missing)} weights of the {type(model).__name__} it configures "
                         f"(e.g. {missing[:3]}): it is not a complete checkpoint of that model.")
    return model


def check_checkpoint_weights(model, checkpoint: str) -> None:
    """The Trainer loads a checkpoint's weights without strictness: a model built with other sizes than the run had
    would resume partly random. Refuse that, naming the difference."""
    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.exists(path):  # sharded (FSDP) checkpoints: their own loader checks them
        return
    with safe_open(path, framework="pt") as weights:
        saved = set(weights.keys())
    tied = {}  # tied weights are saved once, under one of their names
    for name, tensor in model.state_dict().items():
        tied.setdefault(tensor.data_ptr(), []).append(name)
    missing = [names[0] for names in tied.values() if not saved & set(names)]
    unexpected = saved - {name for names in tied.values() for name in names}
    if missing or unexpected:
        raise ValueError(f"--resume_from_checkpoint {checkpoint} holds another model than these flags build (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): resume with the model flags "
                         "(--model, --depth, --vocab_size, ...) of that run.")


def build_model(args: StageArguments, tokenizer):
    kwargs = dict(attn_implementation=args.attn_implementation)
    if args.stage == "base":
        if args.model:
            return from_pretrained_complete(AutoModelForCausalLM, args.model,
                                            use_fused_kernels=args.use_fused_kernels, **kwargs)
        preset = presets.text_config if args.block == "llama" else presets.nanochat_config
        config = preset(
            depth=args.depth, head_dim=args.head_dim, vocab_size=len(tokenizer),
            max_position_embeddings=args.pack_max_length, use_fused_kernels=args.use_fused_kernels,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return AutoModelForCausalLM.from_config(config, **kwargs)
    start = AutoConfig.from_pretrained(args.model)
    if isinstance(start, NanoVisionConfig):
        start.text_config.use_fused_kernels = args.use_fused_kernels
        return from_pretrained_complete(AutoModelForImageTextToText, args.model, config=start, **kwargs)
    connector = dict(connector_type=args.connector_type, pixel_shuffle_factor=args.pixel_shuffle_factor,
                     connector_position_embedding=args.connector_position_embedding,
                     image_token_id=tokenizer.image_token_id)
    if args.vision_model:
        model = NanoVisionForConditionalGeneration.from_pretrained_components(args.model, args.vision_model, **connector)
    else:
        vision_config = SiglipVisionConfig(
            image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_hidden_size,
            intermediate_size=4 * args.vision_hidden_size, num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_heads,
        )
        model = NanoVisionForConditionalGeneration.from_text_model(
            from_pretrained_complete(AutoModelForCausalLM, args.model), vision_config, **connector)
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


def log_data_use(args: StageArguments, num_examples: int, stats) -> None:
    """What the stage trains on: every row of the dataset (bad rows stop the run before it starts, so none is
    dropped), and how much packing truncated to --pack_max_length."""
    fix = "; raise --pack_max_length to train on them whole" if stats.truncated_examples else ""
    logger.log(logging.WARNING if stats.truncated_examples else logging.INFO, "%s stage data: %d examples from %s, "
               "none dropped; %s%s", args.stage, num_examples, args.dataset, stats.summary(), fix)


def release_process_group():
    """Destroy the process group (a no-op in a single process): a process that exits with a gloo group alive can
    abort with SIGABRT ("terminate called without an active exception") when interpreter shutdown frees the tensors
    its worker threads still hold (pytorch/pytorch#190489), failing a run whose training and save succeeded."""
    PartialState().destroy_process_group()


def run_stage(args: StageArguments, training_args: NanoVisionTrainingArguments, callbacks=None) -> Path:
    """Train one stage and export `<output_dir>/final`: a `save_pretrained` folder with the tokenizer, the processor
    (vision stages), remote-code files, generation config and a model card. Returns that folder."""
    validate_arguments(args, training_args)
    # at exit rather than on return: one process may run several stages (the quickstart does)
    atexit.unregister(release_process_group)
    atexit.register(release_process_group)
    torch.manual_seed(training_args.seed)
    if args.dataset == "builtin":
        dataset = builtin_dataset(args.stage, args.builtin_train_size, max(1, args.builtin_train_size // 10),
                                  args.image_size, seed=training_args.seed, turns=args.builtin_turns,
                                  caption_turn=args.builtin_caption_turn)["train"]
    else:
        dataset = load_stage_dataset(args.dataset, args.stage, args.dataset_split)
    checkpoint = training_args.resume_from_checkpoint
    tokenizer = load_tokenizer(args, dataset, checkpoint)
    model = build_model(args, tokenizer)
    if checkpoint:
        check_checkpoint_weights(model, checkpoint)
    is_vlm = isinstance(model, NanoVisionForConditionalGeneration)
    processor = build_processor(model, tokenizer) if is_vlm else None
    if args.tower_pretrain_steps:
        pretrain_vision_tower(model, processor, dataset, args.tower_pretrain_steps, training_args.output_dir,
                              batch_size=args.tower_pretrain_batch_size, learning_rate=args.tower_pretrain_lr,
                              seed=training_args.seed, bf16=training_args.bf16, phrases=args.tower_pretrain_phrases,
                              disable_tqdm=training_args.disable_tqdm)
    if is_vlm:
        wanted = set(args.train_modules.split(","))
        model.set_trainable(**{part: part in wanted for part in PARTS})
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)

    tokenized = tokenize_for_stage(dataset, args.stage, tokenizer,
                                   processor, args.num_proc)
    image_ids = {}
    if is_vlm:
        image_ids = dict(image_token_id=processor.image_token_id, image_start_token_id=processor.image_start_token_id,
                         image_end_token_id=processor.image_end_token_id, num_image_tokens=processor.num_image_tokens)
    packed, stats = pack_dataset(tokenized, args.pack_max_length, args.num_proc, log_stats=False, **image_ids)
    log_data_use(args, len(dataset), stats)
    collator = PackedDataCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.pack_max_length,
                                  image_processor=processor.image_processor if is_vlm else None,
                                  return_flash_attn_kwargs=args.attn_implementation.startswith("flash")
                                  or args.attn_implementation == VARLEN_ATTENTION)

    part_lrs = {part: lr for part, lr in (("language_model", args.lm_lr), ("connector", args.connector_lr),
                                          ("vision_tower", args.vision_lr)) if lr is not None}
    trainer = NanoVisionTrainer(
        model=model, args=training_args, train_dataset=packed, data_collator=collator,
        processing_class=processor or tokenizer, part_learning_rates=part_lrs,
        muon_lr=args.muon_lr if training_args.use_muon else None,
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, seq_len=args.pack_max_length,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=checkpoint)

    final = Path(training_args.output_dir) / "final"
    trainer.save_model(final)  # on every rank: gathering FSDP-sharded weights is collective
    if trainer.args.should_save:  # the rest once, from the main process (an upload per rank would repeat it)
        (processor or tokenizer).save_pretrained(final)
        trainer_settings = training_args.to_dict()
        settings = {"stage": args.stage, "train_modules": args.train_modules, "steps": trainer.state.global_step,
                    "train_loss": round(result.training_loss, 4), "packing": stats.summary(),
                    **{key: trainer_settings[key] for key in ("per_device_train_batch_size",
                                                              "gradient_accumulation_steps", "learning_rate", "optim",
                                                              "bf16")},
                    **{key: getattr(args, key) for key in ("pack_max_length", "lm_lr", "connector_lr", "vision_lr",
                                                           "attn_implementation", "use_fused_kernels")}}
        if training_args.use_muon:
            settings.update(optim="muon", muon_lr=args.muon_lr)
        (final / "training_settings.json").write_text(json.dumps(settings, indent=2))
        write_model_card(final, base_model=args.model, datasets=[args.dataset], stage=args.stage, settings=settings)
        if training_args.push_final_to_hub:
            push_folder_to_hub(final, training_args.hub_model_id, private=bool(training_args.hub_private_repo))
        logger.info("%s stage done: %s", args.stage, final)
    trainer.accelerator.wait_for_everyone()  # every rank may read the folder next (e.g. the next stage)
    return final
