"""Tests of the synthetic shapes data (nanovision.data.shapes)."""

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from datasets import DatasetDict, Image, List, Value

from nanovision.data import shapes
from nanovision.data.shapes import (
    accuracy_by_type,
    caption_dataset,
    caption_scene,
    normalize_answer,
    qa_dataset,
    render_scene,
    score_answer,
    text_corpus,
    text_dataset,
)

# Written out here rather than imported, so that a change of vocabulary is a visible test change.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225), "yellow": (240, 210, 20),
          "purple": (140, 40, 180), "orange": (250, 130, 10)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
PLACES = {"on the left": "left", "in the middle": "middle", "on the right": "right"}
NUMBERS = ("zero", "one", "two", "three")
ANSWERS = {"color": set(COLORS), "count": {"one", "two", "three"}, "position": set(POSITIONS),
           "presence": {"yes", "no"}}
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def qa():
    return qa_dataset(num_train=400, num_test=100, image_size=64, seed=0)


def _question(row):
    user, assistant = row["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    assert [part["type"] for part in assistant["content"]] == ["text"]
    assert assistant["content"][0]["text"] == row["answer"]
    return user["content"][1]["text"]


def _only(objects, what):
    assert len(objects) == 1, f"ambiguous or missing referent for {what}: {objects}"
    return objects[0]


def derive_answer(question, objects):
    """Answer `question` from the scene's objects, independently of the generator's code."""
    shape_alt, color_alt = "|".join(SHAPES), "|".join(COLORS)
    if m := re.fullmatch(rf"What color is the ({shape_alt})\?", question):
        return "color", _only([o for o in objects if o["shape"] == m[1]], question)["color"]
    if m := re.fullmatch(r"What color is the shape (on the left|in the middle|on the right)\?", question):
        return "color", _only([o for o in objects if o["position"] == PLACES[m[1]]], question)["color"]
    if re.fullmatch(r"How many shapes (are there|are in the image|can you see)\?", question):
        return "count", NUMBERS[len(objects)]
    if m := re.fullmatch(rf"Where is the (?:({color_alt}) )?({shape_alt})\?", question):
        matches = [o for o in objects if o["shape"] == m[2] and m[1] in (None, o["color"])]
        return "position", _only(matches, question)["position"]
    if m := re.fullmatch(rf"Is there an? (?:({color_alt}) )?({shape_alt})\?", question):
        found = any(o["shape"] == m[2] and m[1] in (None, o["color"]) for o in objects)
        return "presence", "yes" if found else "no"
    if m := re.fullmatch(rf"Is there an? ({color_alt}) shape\?", question):
        return "presence", "yes" if any(o["color"] == m[1] for o in objects) else "no"
    raise AssertionError(f"unexpected question: {question!r}")


def test_qa_columns_and_features(qa):
    assert isinstance(qa, DatasetDict) and set(qa) == {"train", "test"}
    assert len(qa["train"]) == 400 and len(qa["test"]) == 100
    features = qa["train"].features
    assert qa["train"].column_names == ["messages", "images", "question_type", "answer", "scene"]
    assert features["images"] == List(Image())
    assert features["answer"] == Value("string") and features["question_type"] == Value("string")
    row = qa["train"][0]
    assert len(row["images"]) == 1
    image = row["images"][0]
    assert image.mode == "RGB" and image.size == (64, 64)


def test_answers_match_scene_and_are_unambiguous(qa):
    for split in ("train", "test"):
        for row in qa[split]:
            objects = json.loads(row["scene"])["objects"]
            question_type, answer = derive_answer(_question(row), objects)
            assert question_type == row["question_type"]
            assert answer == row["answer"], (_question(row), objects)
            assert row["answer"] in ANSWERS[question_type]


def test_every_type_and_answer_present_and_balanced(qa):
    rows = qa["train"]
    types = Counter(rows["question_type"])
    assert set(types) == set(ANSWERS) and all(count == 100 for count in types.values())
    for question_type, vocabulary in ANSWERS.items():
        answers = Counter(a for a, t in zip(rows["answer"], rows["question_type"]) if t == question_type)
        assert set(answers) == vocabulary, question_type
        assert max(answers.values()) <= 0.6 * sum(answers.values()), (question_type, answers)
    assert shapes.ANSWER_VOCAB == ("red", "green", "blue", "yellow", "purple", "orange", "one", "two", "three",
                                   "left", "middle", "right", "yes", "no")


def test_scene_invariants(qa):
    for row in qa["train"]:
        objects = json.loads(row["scene"])["objects"]
        assert 1 <= len(objects) <= 3
        assert [o["position"] for o in objects] == sorted({o["position"] for o in objects}, key=POSITIONS.index)
        assert len({(o["shape"], o["color"]) for o in objects}) == len(objects)
        spans = sorted((o["x"] - o["size"], o["x"] + o["size"]) for o in objects)
        assert spans[0][0] > 0 and spans[-1][1] < 1
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), "objects overlap"
        assert all(o["size"] < o["y"] < 1 - o["size"] for o in objects)


def _object_mask(pixels, obj, size):
    """Pixels of the object's color inside its own horizontal window (slots never overlap)."""
    lo, hi = int((obj["x"] - obj["size"]) * size) - 1, int((obj["x"] + obj["size"]) * size) + 2
    mask = np.zeros(pixels.shape[:2], dtype=bool)
    mask[:, max(lo, 0):hi] = np.all(pixels[:, max(lo, 0):hi] == COLORS[obj["color"]], axis=-1)
    return mask


@pytest.mark.parametrize("image_size", [64, 96])
def test_shapes_are_drawn(image_size):
    data = qa_dataset(num_train=60, num_test=0, image_size=image_size, seed=1)["train"]
    for row in data:
        image = row["images"][0]
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        pixels = np.asarray(image)
        objects = json.loads(row["scene"])["objects"]
        assert (pixels == np.uint8(render_scene(row["scene"], image_size))).all()  # scene JSON reproduces it
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in objects:
            cx, cy = int(obj["x"] * image_size), int(obj["y"] * image_size)
            assert tuple(pixels[cy, cx]) == COLORS[obj["color"]]
            mask = _object_mask(pixels, obj, image_size)
            covered |= mask
            ys, xs = np.nonzero(mask)
            fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # share of the bounding box that is painted
            low, high = {"square": (0.97, 1.0), "circle": (0.68, 0.9), "triangle": (0.4, 0.66)}[obj["shape"]]
            assert low <= fill <= high, (obj, fill)
            radius_px = obj["size"] * image_size
            assert mask.sum() > radius_px ** 2  # big enough to see at this resolution
        # Everything else is white background: no stray pixels, no colors but the objects'.
        assert (pixels[~covered] == WHITE).all()


def test_render_scene_simple_inputs():
    image = render_scene([{"shape": "circle", "color": "red", "position": "left"},
                          {"shape": "square", "color": "blue", "position": [2, 0]},
                          {"shape": "triangle", "color": "green", "position": (0.5, 0.75)}], image_size=96)
    pixels = np.asarray(image)
    assert tuple(pixels[48, 16]) == COLORS["red"]
    assert tuple(pixels[16, 80]) == COLORS["blue"]
    assert tuple(pixels[72, 48]) == COLORS["green"]
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[90, 90]) == WHITE
    assert render_scene({"objects": []}).getcolors() == [(64 * 64, WHITE)]
    with pytest.raises(ValueError):
        render_scene([{"shape": "hexagon", "color": "red", "position": "left"}])


def test_determinism_prefix_and_seeds():
    first = qa_dataset(num_train=24, num_test=8, seed=5)
    second = qa_dataset(num_train=24, num_test=8, seed=5)
    for split in ("train", "test"):
        assert first[split].data.table.equals(second[split].data.table)
    longer = qa_dataset(num_train=40, num_test=0, seed=5)["train"]
    assert longer.select(range(24)).data.table.equals(first["train"].data.table)  # a smaller set is a prefix
    other = qa_dataset(num_train=24, num_test=8, seed=6)
    assert other["train"]["scene"] != first["train"]["scene"]
    captions = caption_dataset(num_train=10, num_test=5, seed=2)
    assert captions["train"].data.table.equals(caption_dataset(num_train=10, num_test=5, seed=2)["train"].data.table)
    assert text_corpus(20, seed=3) == text_corpus(20, seed=3) != text_corpus(20, seed=4)


def test_train_and_test_are_disjoint(qa):
    train_scenes, test_scenes = set(qa["train"]["scene"]), set(qa["test"]["scene"])
    assert len(train_scenes) == len(qa["train"])
    assert not train_scenes & test_scenes
    train_images = {np.asarray(row["images"][0]).tobytes() for row in qa["train"]}
    assert not any(np.asarray(row["images"][0]).tobytes() in train_images for row in qa["test"])


def test_captions():
    data = caption_dataset(num_train=50, num_test=10, image_size=96, seed=0)
    assert data["train"].column_names == ["image", "caption", "scene"]
    assert data["train"].features["image"] == Image()
    pattern = rf"(an?) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (on the left|in the middle|on the right)"
    for row in data["train"]:
        assert row["image"].size == (96, 96) and row["image"].mode == "RGB"
        caption = row["caption"]
        assert caption.endswith(".") and caption == caption_scene(row["scene"])
        found = re.findall(pattern, caption)
        assert caption == {1: "{}.", 2: "{} and {}.", 3: "{}, {} and {}."}[len(found)].format(
            *(" ".join(parts) for parts in found))
        objects = json.loads(row["scene"])["objects"]
        assert [(c, s, PLACES[p]) for _, c, s, p in found] == [(o["color"], o["shape"], o["position"]) for o in objects]
        assert all(article == ("an" if color == "orange" else "a") for article, color, _, _ in found)
    assert caption_scene([{"shape": "circle", "color": "red", "position": "left"},
                          {"shape": "square", "color": "blue", "position": "right"}]) == \
        "a red circle on the left and a blue square on the right."


def test_text_dataset_and_vocabulary():
    data = text_dataset(num_train=300, num_test=30, seed=0)
    assert set(data) == {"train", "test"} and data["train"].column_names == ["text"]
    assert len(data["train"]) == 300 and len(data["test"]) == 30
    assert not set(data["train"]["text"]) & set(data["test"]["text"])
    words = Counter(re.findall(r"[a-z]+", " ".join(data["train"]["text"]).lower()))
    vocabulary = set(COLORS) | set(SHAPES) | set(POSITIONS) | {"one", "two", "three", "yes", "no", "what", "where",
                                                               "how", "many", "color", "question", "answer"}
    assert vocabulary <= set(words), vocabulary - set(words)
    assert all(10 < len(text) < 600 for text in data["train"]["text"])


def test_messages_render_with_chat_template(qa):
    from nanovision.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(text_corpus(50), vocab_size=300)
    row = qa["train"][3]
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert text == f"<|bos|><|user|><image>{_question(row)}<|end|><|assistant|>{row['answer']}<|end|>"


def test_score_answer():
    assert normalize_answer("  The RED.\n") == "red"
    assert score_answer("Red", "red") and score_answer("red.", "red") and score_answer(" left!", "left")
    assert score_answer("the left", "left") and score_answer("2", "two") and score_answer("Yes.", "yes")
    assert score_answer("  purple  ", "purple") and score_answer("YES", "yes")
    assert not score_answer("red circle", "red")
    assert not score_answer("reddish", "red")
    assert not score_answer("", "red") and not score_answer(None, "red")
    assert not score_answer("no", "yes")


def test_accuracy_by_type():
    records = [
        {"question_type": "color", "prediction": "Red.", "answer": "red"},
        {"question_type": "color", "prediction": "blue", "answer": "red"},
        {"question_type": "count", "prediction": "2", "answer": "two"},
        {"question_type": "presence", "correct": False},
    ]
    result = accuracy_by_type(records)
    assert result == {"color": 0.5, "count": 1.0, "presence": 0.0, "overall": 0.5, "n": 4}
    assert list(result)[:3] == ["color", "count", "presence"]
    assert accuracy_by_type([]) == {"overall": 0.0, "n": 0}


def test_generation_speed():
    start = time.perf_counter()
    data = qa_dataset(num_train=2000, num_test=10, image_size=64, seed=7)
    elapsed = time.perf_counter() - start
    assert len(data["train"]) == 2000
    assert elapsed < 30, f"2000 QA samples took {elapsed:.1f}s"


def test_multi_turn_training_conversations():
    single = qa_dataset(num_train=12, num_test=4, seed=3)
    multi = qa_dataset(num_train=12, num_test=4, seed=3, train_turns=4)
    assert multi["test"].data.table.equals(single["test"].data.table)  # held-out questions stay single-turn
    for one, many in zip(single["train"], multi["train"]):
        assert many["messages"][:2] == one["messages"]  # the first turn and its columns do not change
        assert (many["question_type"], many["answer"], many["scene"]) == (one["question_type"], one["answer"],
                                                                           one["scene"])
        turns = many["messages"]
        assert 4 <= len(turns) <= 8 and len(turns) % 2 == 0
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        questions = [m["content"][-1]["text"] for m in turns[::2]]
        assert len(set(questions)) == len(questions)
        assert all(part["type"] == "text" for m in turns[2:] for part in m["content"])  # one image, first turn
        prefixes = {"What color": "color", "How many": "count", "Where": "position", "Is there": "presence"}
        kinds = []
        for question, reply in zip(turns[::2], turns[1::2]):
            kinds.append(next(kind for prefix, kind in prefixes.items()
                              if question["content"][-1]["text"].startswith(prefix)))
            assert reply["content"][0]["text"] in shapes.ANSWERS_BY_TYPE[kinds[-1]]
        assert len(set(kinds)) >= 3  # the follow-ups walk on through the question types
    with pytest.raises(ValueError, match="turns"):
        shapes.qa_sample(0, turns=0)


def test_caption_turn_closes_training_conversations():
    plain = qa_dataset(num_train=8, num_test=4, seed=5, train_turns=3)
    captioned = qa_dataset(num_train=8, num_test=4, seed=5, train_turns=3, caption_turn=True)
    assert captioned["test"].data.table.equals(plain["test"].data.table)
    for one, many in zip(plain["train"], captioned["train"]):
        assert many["messages"][:-2] == one["messages"]
        ask, reply = many["messages"][-2:]
        assert ask == {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}
        assert reply["content"][0]["text"] == shapes.caption_scene(many["scene"])


# --- the training data checks (nanovision.training.data.load_stage_dataset / require_columns)

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}
ANSWER = {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("stage, lines, message", [
    ("base", ['{"text": "a red circle."}', '{"text": "two shapes.",}', '{"text": "x"}'],
     r"{path}, line 2: not valid JSON \(.*\)"),
    ("base", ['{"text": "a red circle."}', '["a list", "not a row"]'],
     r"{path}, line 2: a JSON list, not an object"),
    ("base", [{"content": "hello"}], r"expects columns \['text'\], but {path} lacks \['text'\]"),
    ("vision", [{"image": "a.png"}], r"lacks \['caption'\]"),
    ("base", [{"text": 3}, {"text": 4}], r"Column 'text' of {path} holds Value\('int64'\).*needs a string per row"),
    ("base", [{"text": "fine"}, {"text": None}, {"text": None}], r"2 of 3 rows of {path} have no 'text' \(rows 1, 2\)"),
    ("vision", [{"image": "a.png", "caption": ""}], r"1 of 1 rows of {path} have no 'caption' \(row 0\)"),
    ("sft", [{"messages": [USER, ANSWER], "images": ["a.png"]}, {"messages": [USER], "images": ["a.png"]}],
     r"1 of 2 conversations in {path} have no assistant turn \(row 1\): SFT learns from the assistant's replies"),
    ("sft", [{"messages": [USER, ANSWER], "images": ["a.png", "b.png"]}],
     r"number of {{'type': 'image'}} parts other than their number of images \(row 0\)"),
    ("sft", [{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "hello"}],
              "images": []}], r"a role other than system, user or assistant \(row 0\)"),
    ("sft", [{"messages": "hello", "images": []}], r"Column 'messages' of {path} holds .*needs a list of"),
])
def test_bad_training_data_is_named_with_its_file_and_rows(tmp_path, stage, lines, message):
    from nanovision.training.data import load_stage_dataset

    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(ValueError, match=message.format(path=re.escape(path))):
        load_stage_dataset(path, stage)


def test_empty_data_and_missing_splits_are_named(tmp_path):
    from datasets import Dataset

    from nanovision.training.data import load_stage_dataset, tokenize_for_stage

    path = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=re.escape(f"{path} (split 'train') has no rows")):
        load_stage_dataset(path, "base")
    DatasetDict({"validation": Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"has no split 'train' \(it has \['validation'\]\): pass --dataset_split"):
        load_stage_dataset(str(tmp_path / "saved"), "base")
    # the same checks guard data handed to the tokenization directly
    silent = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]], "images": [[]]})
    with pytest.raises(ValueError, match=r"1 of 1 conversations in the dataset have no assistant turn \(row 0\)"):
        tokenize_for_stage(silent, "sft", tokenizer=None)


def test_good_json_data_loads_with_image_paths_as_images(tmp_path):
    from nanovision.training.data import load_stage_dataset

    render_scene([{"shape": "circle", "color": "red", "position": "left"}], 32).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [USER, ANSWER], "images": [str(tmp_path / "a.png")]}])
    data = load_stage_dataset(path, "sft")
    assert data.features["images"] == List(Image()) and data[0]["images"][0].size == (32, 32)
    whole = tmp_path / "captions.json"  # one JSON document rather than JSON lines
    whole.write_text(json.dumps([{"image": str(tmp_path / "a.png"), "caption": "a red circle on the left."}]))
    assert load_stage_dataset(str(whole), "vision")[0]["caption"] == "a red circle on the left."
