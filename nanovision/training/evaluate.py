"""Held-out question answering accuracy on the built-in shapes data, for any checkpoint."""

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..data import shapes


def answer_questions(model, processor, samples, batch_size: int = 32, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers for `qa_dataset` rows (their user turn only), batched with left padding."""
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in tqdm(range(0, len(samples), batch_size), desc="answering", disable=None):  # None: off when piped
        batch = samples[start:start + batch_size]
        prompts = [processor.apply_chat_template(messages[:1], add_generation_prompt=True)
                   for messages in batch["messages"]]
        images = [image for sample_images in batch["images"] for image in sample_images]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def evaluate_checkpoint(path, num_test: int = 400, seed: int = 0, image_size: int | None = None,
                        show: int = 5, batch_size: int = 32) -> dict:
    """Load with the Auto classes, answer the held-out questions, print a few and `accuracy: X (n=N)`."""
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    image_size = image_size or model.config.vision_config.image_size
    test = shapes.qa_dataset(num_train=1, num_test=num_test, image_size=image_size, seed=seed)["test"]
    predictions = answer_questions(model, processor, test, batch_size=batch_size)
    records = [{"question_type": kind, "prediction": prediction, "answer": answer}
               for kind, prediction, answer in zip(test["question_type"], predictions, test["answer"])]
    for message, record in list(zip(test["messages"], records))[:show]:
        question = next(part["text"] for part in message[0]["content"] if part["type"] == "text")
        mark = "ok " if shapes.score_answer(record["prediction"], record["answer"]) else "BAD"
        print(f"[{mark}] {question} -> {record['prediction'].strip()!r} (expected {record['answer']!r})")
    scores = shapes.accuracy_by_type(records)
    print("  ".join(f"{kind}: {scores[kind]:.3f}" for kind in shapes.QUESTION_TYPES if kind in scores))
    print(f"accuracy: {scores['overall']:.3f} (n={scores['n']})")
    return scores
