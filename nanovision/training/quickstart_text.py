"""The README's main job until the full vision-language quickstart lands: train a tiny nanovision text model on the
built-in corpus with the HF Trainer, save it as a remote-code checkpoint, reload it with AutoModelForCausalLM and
generate."""

import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from .. import presets
from ..data.shapes import text_dataset
from ..tokenizer import train_tokenizer

logger = logging.getLogger("nanovision")

PROMPTS = ["a red circle", "there are two shapes:", "Where is the blue"]


def tokenize_into_blocks(texts, tokenizer, block_size):
    """Documents as <|bos|> text <|end|>, concatenated and cut into equal blocks (the tail shorter than a block is
    reported, not silently lost)."""
    stream = []
    for text in texts:
        stream += [tokenizer.bos_token_id, *tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    usable = len(stream) // block_size * block_size
    logger.info("corpus: %d documents, %d tokens -> %d blocks of %d (%d tail tokens unused)",
                len(texts), len(stream), usable // block_size, block_size, len(stream) - usable)
    return [{"input_ids": stream[i:i + block_size], "labels": stream[i:i + block_size]}
            for i in range(0, usable, block_size)]


def run(output_dir="outputs/quickstart", max_steps=300, seed=0):
    start = time.time()
    torch.manual_seed(seed)
    output_dir = Path(output_dir)
    data = text_dataset(num_train=4000, num_test=50, seed=seed)
    tokenizer = train_tokenizer(data["train"]["text"], vocab_size=1024)
    config = presets.text_config(depth=4, head_dim=64, vocab_size=len(tokenizer), max_position_embeddings=256,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=max_steps, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.0, logging_steps=25,
        save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False,
    )
    Trainer(model=model, args=args, train_dataset=tokenize_into_blocks(data["train"]["text"], tokenizer, 128)).train()
    model.save_pretrained(output_dir / "checkpoint")
    tokenizer.save_pretrained(output_dir / "checkpoint")

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir / "checkpoint", trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "checkpoint")
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]])
        out = reloaded.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        print(f"{prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    print(f"checkpoint: {output_dir / 'checkpoint'} ({time.time() - start:.0f} s)")
