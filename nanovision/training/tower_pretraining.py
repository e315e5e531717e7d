"""Vision-tower pretraining on image-caption pairs by caption-word classification (the idea of SuperClass,
Huang et al. 2024: predict the caption's tokens from the image, no text tower).

Why: a freshly initialised tower gives the language model features it only learns to read after far more SFT
steps than a small run has. Here every image token (tower + connector output) is scored against the language
model's own input embeddings; each word's score is its best image token's (max over tokens), and a softmax over
the vocabulary is fitted to the caption's bag of words. Image tokens thereby land near the embeddings of the words
that describe their region ("red", "circle", "left"), which the language model already reads.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

logger = logging.getLogger("nanovision")


class CaptionWordsObjective(nn.Module):
    """Wraps a `NanoVisionForConditionalGeneration`; `forward(pixel_values, word_targets)` returns the loss.
    Only the vision tower, the connector and a learned scale/bias are trained: the word embeddings are a frozen
    copy of the language model's."""

    def __init__(self, model):
        super().__init__()
        self.vision = model.model
        words = model.get_input_embeddings().weight.detach().float()
        self.register_buffer("word_directions", F.normalize(words, dim=-1), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.word_bias = nn.Parameter(torch.zeros(words.shape[0]))

    def forward(self, pixel_values, word_targets):
        image_tokens = self.vision.get_image_features(pixel_values).pooler_output.float()
        scores = self.logit_scale * F.normalize(image_tokens, dim=-1) @ self.word_directions.T + self.word_bias
        logits = scores.max(dim=1).values  # [images, vocab]: a word is in the image if some token shows it
        targets = word_targets / word_targets.sum(-1, keepdim=True)
        return {"loss": -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()}


class CaptionWordsCollator:
    """`{"image", "caption"}` rows -> pixel values and the caption's bag of words (multi-hot over the vocabulary;
    special tokens excluded)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.special_ids = tokenizer.all_special_ids

    def __call__(self, rows):
        pixel_values = self.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]
        targets = torch.zeros(len(rows), len(self.tokenizer))
        for index, row in enumerate(rows):
            targets[index, self.tokenizer(row["caption"], add_special_tokens=False)["input_ids"]] = 1
        targets[:, self.special_ids] = 0
        empty = targets.sum(-1) == 0
        if empty.any():
            raise ValueError(f"Caption(s) {[rows[i]['caption'] for i in empty.nonzero()[:, 0].tolist()]!r} have no "
                             f"words: the tower pretraining needs non-empty captions in the `caption` column.")
        return {"pixel_values": pixel_values, "word_targets": targets}


def pretrain_vision_tower(model, processor, dataset, steps: int, output_dir: str, batch_size: int = 64,
                          learning_rate: float = 1e-3, seed: int = 0, bf16: bool = False) -> float:
    """Train `model`'s vision tower and connector for `steps` steps on `dataset` (`image`, `caption` columns)
    with the HF Trainer. Leaves the language model frozen and the tower and connector trainable: the caller sets
    the parts its next training trains. Returns the mean training loss."""
    model.set_trainable(vision_tower=True, connector=True, language_model=False)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, optim="adamw_torch_fused",
        logging_steps=max(1, steps // 10), save_strategy="no", remove_unused_columns=False, report_to=[], seed=seed,
        dataloader_num_workers=0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=CaptionWordsObjective(model), args=args, train_dataset=dataset,
                      data_collator=CaptionWordsCollator(processor.image_processor, processor.tokenizer))
    loss = trainer.train().training_loss
    logger.info("vision tower pretraining: %d steps, mean loss %.3f", steps, loss)
    return loss
