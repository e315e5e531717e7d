"""Vision-tower pretraining on image-caption pairs by caption-word classification (the idea of SuperClass,
Huang et al. 2024: predict the caption's tokens from the image, no text tower).

Why: a freshly initialised tower gives the language model features it only learns to read after far more SFT
steps than a small run has. Here every image token (tower + connector output) is scored against the language
model's own input embeddings; each word's score is its best image token's (max over tokens), and a softmax over
the vocabulary is fitted to the caption's bag of words. Image tokens thereby land near the embeddings of the words
that describe their region ("red", "circle", "left"), which the language model already reads.

The bag of words does not say which words belong together: a token may show "red" while another shows "circle".
With `phrases`, each caption phrase ("a red circle on the left"; captions split at commas and "and") is also matched
against the images of the batch: its score on an image is its best token's mean score over the phrase's words, and
a softmax over the images is fitted to the images whose captions hold that phrase. A phrase then only scores high
where one token shows its colour, shape and place together, the binding that questions like "What color is the
shape on the left?" need.
"""

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

logger = logging.getLogger("nanovision")

PHRASE_SEPARATOR = re.compile(r"\s*,\s*|\s+and\s+")


class CaptionWordsObjective(nn.Module):
    """Wraps a `NanoVisionForConditionalGeneration`; `forward(pixel_values, word_targets, phrase_words=None,
    phrase_images=None)` returns the loss (the phrase term when the collator made phrases).
    Only the vision tower, the connector and a learned scale/bias are trained: the word embeddings are a frozen
    copy of the language model's."""

    def __init__(self, model):
        super().__init__()
        self.vision = model.model
        words = model.get_input_embeddings().weight.detach().float()
        self.register_buffer("word_directions", F.normalize(words, dim=-1), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.word_bias = nn.Parameter(torch.zeros(words.shape[0]))

    def forward(self, pixel_values, word_targets, phrase_words=None, phrase_images=None):
        image_tokens = self.vision.get_image_features(pixel_values).pooler_output.float()
        token_scores = self.logit_scale * F.normalize(image_tokens, dim=-1) @ self.word_directions.T
        logits = (token_scores + self.word_bias).max(dim=1).values  # [images, vocab]: some token shows the word
        targets = word_targets / word_targets.sum(-1, keepdim=True)
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        if phrase_words is not None:
            # [phrases, images]: a phrase matches an image where one token shows all of its words
            phrase_scores = torch.einsum("itv,pv->pit", token_scores, phrase_words).max(dim=-1).values
            targets = phrase_images / phrase_images.sum(-1, keepdim=True)
            loss = loss - (targets * F.log_softmax(phrase_scores, dim=-1)).sum(-1).mean()
        return {"loss": loss}


class PreparedCaptions(torch.utils.data.Dataset):
    """An `{"image", "caption"}` dataset with every image processed and every caption tokenized once, held in memory
    (`pixel_values`: images x 3 x height x width float32; 4,000 images of 64x64 take 197 MB). The pretraining passes
    over a small caption set many times (the quickstart: 19 epochs), and decoding, resizing and tokenizing in every
    step would cost a large part of each step on a CPU. Rows: `pixel_values`, `caption`, `caption_ids`, and with
    `phrases` the caption's distinct phrases (`phrases`) and each phrase's word ids (`phrase_ids`)."""

    def __init__(self, dataset, image_processor, tokenizer, phrases: bool = False, chunk_size: int = 256):
        chunks = range(0, len(dataset), chunk_size)
        self.pixel_values = torch.cat([
            image_processor(dataset[start:start + chunk_size]["image"], return_tensors="pt")["pixel_values"]
            for start in tqdm(chunks, desc="preparing images", disable=True if len(chunks) < 2 else None)])
        self.captions = list(dataset["caption"])
        self.caption_ids = tokenizer(self.captions, add_special_tokens=False)["input_ids"]
        self.phrases = self.phrase_ids = None
        if phrases:
            self.phrases = [sorted(set(filter(None, PHRASE_SEPARATOR.split(caption.strip().rstrip(".")))))
                            for caption in self.captions]
            self.phrase_ids = [tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
                               for texts in self.phrases]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        row = {"pixel_values": self.pixel_values[index], "caption": self.captions[index],
               "caption_ids": self.caption_ids[index]}
        if self.phrases is not None:
            row.update(phrases=self.phrases[index], phrase_ids=self.phrase_ids[index])
        return row


class CaptionWordsCollator:
    """`PreparedCaptions` rows -> pixel values and the caption's bag of words (multi-hot over the vocabulary;
    special tokens excluded). With `phrases`, also the batch's distinct caption phrases as word weights
    (`phrase_words`, [phrases, vocab], each row summing to 1) and which images hold each (`phrase_images`,
    [phrases, images], 0/1)."""

    def __init__(self, tokenizer, phrases: bool = False):
        self.vocab_size = len(tokenizer)
        self.special_ids = tokenizer.all_special_ids
        self.phrases = phrases

    def words(self, id_lists):
        targets = torch.zeros(len(id_lists), self.vocab_size)
        for index, ids in enumerate(id_lists):
            targets[index, ids] = 1
        targets[:, self.special_ids] = 0
        return targets

    def __call__(self, rows):
        pixel_values = torch.stack([row["pixel_values"] for row in rows])
        targets = self.words([row["caption_ids"] for row in rows])
        empty = targets.sum(-1) == 0
        if empty.any():
            raise ValueError(f"Caption(s) {[rows[i]['caption'] for i in empty.nonzero()[:, 0].tolist()]!r} have no "
                             f"words: the tower pretraining needs non-empty captions in the `caption` column.")
        batch = {"pixel_values": pixel_values, "word_targets": targets}
        if self.phrases:
            phrase_ids = {}
            for row in rows:
                phrase_ids.update(zip(row["phrases"], row["phrase_ids"]))
            phrases = sorted(phrase_ids)
            words = self.words([phrase_ids[phrase] for phrase in phrases])
            batch["phrase_words"] = words / words.sum(-1, keepdim=True).clamp(min=1)
            batch["phrase_images"] = torch.tensor([[float(phrase in row["phrases"]) for row in rows]
                                                   for phrase in phrases])
        return batch


def pretrain_vision_tower(model, processor, dataset, steps: int, output_dir: str, batch_size: int = 64,
                          learning_rate: float = 1e-3, seed: int = 0, bf16: bool = False,
                          phrases: bool = False, disable_tqdm: bool = False) -> float:
    """Train `model`'s vision tower and connector for `steps` steps on `dataset` (`image`, `caption` columns)
    with the HF Trainer. Leaves the language model frozen and the tower and connector trainable: the caller sets
    the parts its next training trains. `phrases`: add the phrase-matching term (module docstring);
    `disable_tqdm`: as the stage's TrainingArguments (plain log lines instead of a bar). Returns the mean training
    loss."""
    model.set_trainable(vision_tower=True, connector=True, language_model=False)
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0, optim="adamw_torch_fused",
        logging_steps=max(1, steps // 10), save_strategy="no", remove_unused_columns=False, report_to=[], seed=seed,
        dataloader_num_workers=0, bf16=bf16, use_cpu=not torch.cuda.is_available(), disable_tqdm=disable_tqdm,
    )
    dataset = PreparedCaptions(dataset, processor.image_processor, processor.tokenizer, phrases)
    trainer = Trainer(model=CaptionWordsObjective(model), args=args, train_dataset=dataset,
                      data_collator=CaptionWordsCollator(processor.tokenizer, phrases))
    loss = trainer.train().training_loss
    logger.info("vision tower pretraining: %d steps, mean loss %.3f", steps, loss)
    return loss
