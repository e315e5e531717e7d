"""A deterministic synthetic "shapes world" for training and evaluating a tiny vision-language model.

Every image is a plain white square with one to three big, flat, solid-colored shapes placed in three
horizontal slots (``left``, ``middle``, ``right``), with a little position and size jitter. The world is
deliberately small so that a tiny VLM (a ~2-layer vision tower on 64x64 or 96x96 images) learns it on a
CPU in minutes:

* shapes: :data:`SHAPES` = circle, square, triangle;
* colors: :data:`COLORS` = red, green, blue, yellow, purple, orange (well separated RGB values);
* positions: :data:`POSITIONS` = left, middle, right (one object per slot, so objects never overlap and
  "where is X?" has exactly one answer);
* within a scene the (color, shape) pairs are distinct.

Scenes are plain JSON-able dicts::

    {"objects": [{"shape": "circle", "color": "red", "position": "left", "col": 0,
                  "x": 0.1712, "y": 0.4821, "size": 0.1153}, ...]}

``x``/``y`` are the object's center and ``size`` its radius, all as fractions of the image side, so the
same scene renders at any resolution (:func:`render_scene`). Objects are listed left to right.

Question types (:data:`QUESTION_TYPES`), all answered with one word from :data:`ANSWER_VOCAB`:

* ``color``    "What color is the circle?" (only when that shape occurs once) or
               "What color is the shape on the left?"                              -> a color name
* ``count``    "How many shapes are there?"                                        -> one / two / three
* ``position`` "Where is the red circle?" / "Where is the circle?" (shape unique)  -> left / middle / right
* ``presence`` "Is there a triangle?" / "Is there an orange shape?" /
               "Is there a blue square?"                                           -> yes / no (balanced)

Samples are generated from per-sample random streams keyed by (dataset kind, split, seed, index), so
a builder's output depends only on its arguments, a smaller dataset is a prefix of a larger one with
the same seed, and the ``test`` split comes from a different stream than ``train`` (held-out scenes).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "POSITIONS",
    "QUESTION_TYPES",
    "NUMBER_WORDS",
    "ANSWER_VOCAB",
    "ANSWERS_BY_TYPE",
    "random_scene",
    "render_scene",
    "caption_scene",
    "make_question",
    "qa_messages",
    "qa_sample",
    "caption_sample",
    "text_document",
    "text_corpus",
    "text_dataset",
    "caption_dataset",
    "qa_dataset",
    "normalize_answer",
    "score_answer",
    "accuracy_by_type",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
QUESTION_TYPES: tuple[str, ...] = ("color", "count", "position", "presence")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

ANSWERS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "count": NUMBER_WORDS[1:],
    "position": POSITIONS,
    "presence": ("yes", "no"),
}
ANSWER_VOCAB: tuple[str, ...] = tuple(answer for answers in ANSWERS_BY_TYPE.values() for answer in answers)

# Geometry, as fractions of the image side. Slot centers are at 1/6, 1/2, 5/6 (1/3 apart): with a radius of
# at most MAX_SIZE and a horizontal jitter of at most X_JITTER, neighbouring objects stay apart
# (2 * (MAX_SIZE + X_JITTER) = 0.32 < 1/3), and every object stays inside the image.
MIN_SIZE, MAX_SIZE = 0.10, 0.13
X_JITTER = 0.03
Y_JITTER = 0.15
DEFAULT_SIZE = 0.12
SQUARE_HALF_SIDE = 0.85  # a square's half side, relative to the radius: areas of the three shapes stay similar

_PLACE_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?", "How many shapes can you see?")
_ALL_PAIRS = [(shape, color) for shape in SHAPES for color in COLORS]


def _rng(kind: str, split: str, seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs and platforms.
    return random.Random(f"nanovision.data.shapes/{kind}/{split}/{int(seed)}/{int(index)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------------------
# Scenes and rendering
# ----------------------------------------------------------------------------------------------------------


def random_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> dict[str, Any]:
    """Draw a scene: ``min_objects..max_objects`` objects (at most 3), in distinct slots, with distinct
    (shape, color) pairs, listed left to right. Coordinates are rounded to 4 decimals so that the scene
    survives a JSON round trip unchanged."""
    if not 1 <= min_objects <= max_objects <= len(POSITIONS):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got {min_objects}, {max_objects}")
    count = rng.randint(min_objects, max_objects)
    cols = sorted(rng.sample(range(len(POSITIONS)), count))
    pairs = rng.sample(_ALL_PAIRS, count)
    objects = []
    for col, (shape, color) in zip(cols, pairs):
        objects.append({
            "shape": shape,
            "color": color,
            "position": POSITIONS[col],
            "col": col,
            "x": round((col + 0.5) / len(POSITIONS) + rng.uniform(-X_JITTER, X_JITTER), 4),
            "y": round(0.5 + rng.uniform(-Y_JITTER, Y_JITTER), 4),
            "size": round(rng.uniform(MIN_SIZE, MAX_SIZE), 4),
        })
    return {"objects": objects}


def _objects(scene: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str) -> list[Mapping[str, Any]]:
    if isinstance(scene, str):
        scene = json.loads(scene)
    if isinstance(scene, Mapping):
        scene = scene["objects"]
    return list(scene)


def _object_geometry(obj: Mapping[str, Any]) -> tuple[float, float, float]:
    """(x, y, size) as fractions of the image side. Missing ``x``/``y`` come from ``position``: a slot name
    (``"left"``), a column index, a ``(col, row)`` pair of ints on a 3x3 grid, or an ``(x, y)`` pair of floats."""
    size = float(obj.get("size", DEFAULT_SIZE))
    if "x" in obj and "y" in obj:
        return float(obj["x"]), float(obj["y"]), size
    position = obj.get("position", obj.get("col", "middle"))
    if isinstance(position, str):
        col, row = POSITIONS.index(position), 1
    elif isinstance(position, int):
        col, row = position, 1
    else:
        first, second = position
        if isinstance(first, int) and isinstance(second, int):
            col, row = first, second
        else:
            return float(first), float(second), size
    return (col + 0.5) / 3, (row + 0.5) / 3, size


def render_scene(scene: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` (a scene dict, its list of objects, or its JSON string) as an RGB image.

    Each object needs ``shape`` (one of :data:`SHAPES`) and ``color`` (a name in :data:`COLORS` or an RGB
    triple); its place is ``x``/``y``/``size`` (fractions of the image side) or, failing that, ``position``
    (see :func:`_object_geometry`). Shapes are drawn flat, without anti-aliasing, on a white background.
    """
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in _objects(scene):
        x, y, size = _object_geometry(obj)
        cx, cy, r = x * image_size, y * image_size, size * image_size
        color = obj["color"]
        fill = COLORS[color] if isinstance(color, str) else tuple(int(c) for c in color)
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        elif shape == "square":
            h = r * SQUARE_HALF_SIDE
            draw.rectangle([round(cx - h), round(cy - h), round(cx + h), round(cy + h)], fill=fill)
        elif shape == "triangle":
            # Pointing up, base as wide as the circle; the center (cx, cy) lies inside.
            points = [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
            draw.polygon([(round(px), round(py)) for px, py in points], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r} (expected one of {SHAPES})")
    return image


# ----------------------------------------------------------------------------------------------------------
# Text: captions and questions
# ----------------------------------------------------------------------------------------------------------


def _phrase(obj: Mapping[str, Any]) -> str:
    return f"{_article(obj['color'])} {obj['color']} {obj['shape']} {_PLACE_PHRASES[obj['position']]}"


def caption_scene(scene: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str) -> str:
    """One fixed-template caption, objects left to right, e.g.
    ``"a red circle on the left and a blue square on the right."``"""
    objects = sorted(_objects(scene), key=lambda o: POSITIONS.index(o["position"]))
    phrases = [_phrase(obj) for obj in objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return body + "."


def make_question(scene: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str, question_type: str,
                  rng: random.Random) -> tuple[str, str]:
    """An unambiguous ``(question, answer)`` of ``question_type`` about ``scene`` (answers are in
    :data:`ANSWERS_BY_TYPE`). Objects must occupy distinct positions and have distinct (shape, color) pairs,
    as :func:`random_scene` guarantees."""
    objects = _objects(scene)
    shape_counts = {shape: sum(o["shape"] == shape for o in objects) for shape in SHAPES}
    unique_shape_objects = [o for o in objects if shape_counts[o["shape"]] == 1]

    if question_type == "color":
        if unique_shape_objects and rng.random() < 0.6:
            obj = rng.choice(unique_shape_objects)
            return f"What color is the {obj['shape']}?", obj["color"]
        obj = rng.choice(objects)
        return f"What color is the shape {_PLACE_PHRASES[obj['position']]}?", obj["color"]

    if question_type == "count":
        return rng.choice(_COUNT_QUESTIONS), NUMBER_WORDS[len(objects)]

    if question_type == "position":
        obj = rng.choice(objects)
        if shape_counts[obj["shape"]] == 1 and rng.random() < 0.5:
            return f"Where is the {obj['shape']}?", obj["position"]
        return f"Where is the {obj['color']} {obj['shape']}?", obj["position"]

    if question_type == "presence":
        present_shapes = {o["shape"] for o in objects}
        present_colors = {o["color"] for o in objects}
        present_pairs = {(o["shape"], o["color"]) for o in objects}
        if rng.random() < 0.5:
            obj = rng.choice(objects)
            shape, color = obj["shape"], obj["color"]
            variant = rng.choice(("shape", "color", "pair"))
            answer = "yes"
        else:
            variants = ["color", "pair"] + (["shape"] if len(present_shapes) < len(SHAPES) else [])
            variant = rng.choice(sorted(variants))
            shape = rng.choice([s for s in SHAPES if s not in present_shapes]) if variant == "shape" else None
            color = rng.choice([c for c in COLORS if c not in present_colors]) if variant == "color" else None
            if variant == "pair":
                # Prefer hard negatives: the shape or the color is in the image, but not together.
                near = [p for p in _ALL_PAIRS if p not in present_pairs and (p[0] in present_shapes or p[1] in present_colors)]
                shape, color = rng.choice(near or [p for p in _ALL_PAIRS if p not in present_pairs])
            answer = "no"
        if variant == "shape":
            return f"Is there a {shape}?", answer
        if variant == "color":
            return f"Is there {_article(color)} {color} shape?", answer
        return f"Is there {_article(color)} {color} {shape}?", answer

    raise ValueError(f"unknown question type {question_type!r} (expected one of {QUESTION_TYPES})")


def qa_messages(question: str, answer: str | None = None,
                follow_ups: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Hugging Face chat messages: a user turn with one image and the question, then (if ``answer`` is
    given) the assistant's answer, then one text-only user/assistant turn pair per ``(question, answer)`` in
    ``follow_ups``. Image parts carry ``"text": None`` so that every content part has the same keys (as after a
    round trip through Arrow)."""
    messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    for follow_question, follow_answer in follow_ups:
        messages.append({"role": "user", "content": [{"type": "text", "text": follow_question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": follow_answer}]})
    return messages


# ----------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------


def qa_sample(index: int, seed: int = 0, split: str = "train", image_size: int = 64,
              turns: int = 1, caption_turn: bool = False) -> dict[str, Any]:
    """Sample ``index`` of the QA stream ``(split, seed)``: ``messages``, ``images`` (one PIL image),
    ``question_type`` (cycling through :data:`QUESTION_TYPES`), ``answer`` and ``scene`` (JSON string).

    With ``turns > 1`` the conversation goes on with ``turns - 1`` more questions about the same image (the
    next question types in the cycle, repeated questions skipped): more answers to learn from per image. The
    first turn, and the ``question_type`` and ``answer`` columns that describe it, are the same for every
    ``turns``. With ``caption_turn`` it ends with "Describe the image." answered by the scene's caption: one answer
    that names every object's colour, shape and place together."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    rng = _rng("qa", split, seed, index)
    scene = random_scene(rng)
    question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer = make_question(scene, question_type, rng)
    asked, follow_ups = {question}, []
    for turn in range(1, turns):
        follow_up = make_question(scene, QUESTION_TYPES[(index + turn) % len(QUESTION_TYPES)], rng)
        if follow_up[0] not in asked:
            asked.add(follow_up[0])
            follow_ups.append(follow_up)
    if caption_turn:
        follow_ups.append(("Describe the image.", caption_scene(scene)))
    return {
        "messages": qa_messages(question, answer, follow_ups),
        "images": [render_scene(scene, image_size)],
        "question_type": question_type,
        "answer": answer,
        "scene": json.dumps(scene, sort_keys=True),
    }


def caption_sample(index: int, seed: int = 0, split: str = "train", image_size: int = 64) -> dict[str, Any]:
    """Sample ``index`` of the caption stream ``(split, seed)``: ``image``, ``caption``, ``scene``."""
    scene = random_scene(_rng("caption", split, seed, index))
    return {"image": render_scene(scene, image_size), "caption": caption_scene(scene),
            "scene": json.dumps(scene, sort_keys=True)}


_FACTS = (
    "A circle is round.",
    "A square has four equal sides.",
    "A triangle has three sides.",
    "A square has four corners and a triangle has three corners.",
    "One and one make two.",
    "One and two make three.",
    "After one comes two, and after two comes three.",
    "The colors are red, green, blue, yellow, purple and orange.",
    "The shapes are circles, squares and triangles.",
    "The middle is between the left and the right.",
    "The background is white.",
)


def text_document(rng: random.Random) -> str:
    """A short English document about one random scene: a description, then a few questions with their
    answers (in several phrasings), sometimes a general fact. Teaches a text LM the vocabulary."""
    scene = random_scene(rng)
    objects = scene["objects"]
    body = caption_scene(scene)[:-1]
    n = len(objects)
    intro = rng.choice((
        f"In this picture there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'' if n == 1 else 's'}: {body}.",
        f"The image shows {body}.",
        f"Here we see {body}.",
        body[0].upper() + body[1:] + ".",
    ))
    sentences = [intro]
    asked = set()
    for _ in range(rng.randint(2, 4)):
        question, answer = make_question(scene, rng.choice(QUESTION_TYPES), rng)
        if question in asked:
            continue
        asked.add(question)
        style = rng.randrange(3)
        if style == 0:
            sentences.append(f"Question: {question} Answer: {answer}.")
        elif style == 1:
            sentences.append(f"Q: {question} A: {answer}.")
        else:
            sentences.append(f"{question} {answer.capitalize()}.")
    if rng.random() < 0.3:
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(_FACTS))
    return " ".join(sentences)


def text_corpus(num_docs: int, seed: int = 0, split: str = "train") -> list[str]:
    """``num_docs`` documents from :func:`text_document`, deterministic in ``(seed, split)``."""
    return [text_document(_rng("text", split, seed, index)) for index in range(num_docs)]


# ----------------------------------------------------------------------------------------------------------
# datasets builders
# ----------------------------------------------------------------------------------------------------------


def _features(kind: str):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    if kind == "text":
        return Features({"text": Value("string")})
    if kind == "caption":
        return Features({"image": ImageFeature(), "caption": Value("string"), "scene": Value("string")})
    part = {"type": Value("string"), "text": Value("string")}
    return Features({
        "messages": List({"role": Value("string"), "content": List(part)}),
        "images": List(ImageFeature()),
        "question_type": Value("string"),
        "answer": Value("string"),
        "scene": Value("string"),
    })


def _build(kind: str, rows: Iterator[dict[str, Any]] | list[dict[str, Any]]):
    from datasets import Dataset

    features = _features(kind)
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for row in rows:
        for name in features:
            columns[name].append(row[name])
    return Dataset.from_dict(columns, features=features)


def _check_sizes(num_train: int, num_test: int) -> None:
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be >= 0, got {num_train}, {num_test}")


def text_dataset(num_train: int = 2000, num_test: int = 200, seed: int = 0):
    """`datasets.DatasetDict` ``{"train", "test"}`` with one column ``text`` (see :func:`text_corpus`)."""
    from datasets import DatasetDict

    _check_sizes(num_train, num_test)
    return DatasetDict({
        split: _build("text", ({"text": t} for t in text_corpus(n, seed, split)))
        for split, n in (("train", num_train), ("test", num_test))
    })


def caption_dataset(num_train: int = 2000, num_test: int = 200, image_size: int = 64, seed: int = 0):
    """`datasets.DatasetDict` ``{"train", "test"}`` with columns ``image`` (`datasets.Image`), ``caption``
    and ``scene`` (the scene as a JSON string)."""
    from datasets import DatasetDict

    _check_sizes(num_train, num_test)
    return DatasetDict({
        split: _build("caption", (caption_sample(i, seed, split, image_size) for i in range(n)))
        for split, n in (("train", num_train), ("test", num_test))
    })


def qa_dataset(num_train: int = 4000, num_test: int = 400, image_size: int = 64, seed: int = 0,
               train_turns: int = 1, caption_turn: bool = False):
    """`datasets.DatasetDict` ``{"train", "test"}`` with columns ``messages`` (HF chat format, see
    :func:`qa_messages`), ``images`` (``List(Image())``, one image), ``question_type``, ``answer`` and
    ``scene`` (JSON string). Question types cycle, so each split is balanced over :data:`QUESTION_TYPES`.
    ``train_turns`` questions per image (and, with ``caption_turn``, a closing caption turn) in the train split
    (see :func:`qa_sample`); the test split always asks one question."""
    from datasets import DatasetDict

    _check_sizes(num_train, num_test)
    return DatasetDict({
        split: _build("qa", (qa_sample(i, seed, split, image_size, turns, caption) for i in range(n)))
        for split, n, turns, caption in (("train", num_train, train_turns, caption_turn), ("test", num_test, 1, False))
    })


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------

_ARTICLES = frozenset(("a", "an", "the"))
_DIGITS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven",
           "8": "eight", "9": "nine", "10": "ten"}


def normalize_answer(text: str | None) -> str:
    """Lower-case, turn punctuation into spaces, drop the articles a/an/the, spell out the numbers 0-10,
    collapse whitespace: ``" The Red. "`` -> ``"red"``, ``"2"`` -> ``"two"``."""
    if text is None:
        return ""
    words = re.sub(r"[^\w\s]|_", " ", str(text).lower()).split()
    return " ".join(_DIGITS.get(word, word) for word in words if word not in _ARTICLES)


def score_answer(prediction: str | None, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy_by_type(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Accuracy per question type, plus ``"overall"`` and ``"n"`` (number of records).

    Each record has ``question_type`` and either ``correct`` (bool) or ``prediction`` and ``answer``
    (scored with :func:`score_answer`). Types are listed in :data:`QUESTION_TYPES` order, then any others
    alphabetically; ``"overall"`` is 0.0 when there are no records.
    """
    totals: dict[str, list[int]] = {}
    for record in records:
        if "correct" in record:
            correct = bool(record["correct"])
        else:
            correct = score_answer(record["prediction"], record["answer"])
        tally = totals.setdefault(str(record["question_type"]), [0, 0])
        tally[0] += correct
        tally[1] += 1
    order = [t for t in QUESTION_TYPES if t in totals] + sorted(t for t in totals if t not in QUESTION_TYPES)
    result: dict[str, float | int] = {t: totals[t][0] / totals[t][1] for t in order}
    n = sum(tally[1] for tally in totals.values())
    result["overall"] = sum(tally[0] for tally in totals.values()) / n if n else 0.0
    result["n"] = n
    return result
