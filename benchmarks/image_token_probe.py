"""Do a checkpoint's image tokens (vision tower + connector output, what the language model reads) encode the
colour and the shape of the object at each place? Linear probes answer it apart from the language model.

For each checkpoint: the image tokens of 3,000 built-in scenes (flattened, standardised) fit one softmax
regression per place and attribute (colour or shape, or "nothing there"), scored on 600 held-out scenes where that
place holds an object. Near 1.0 means the information is there in linear form and a failure to answer questions
about it lies with the language model; well below means the tower or connector lose it.

    python benchmarks/image_token_probe.py CHECKPOINT [CHECKPOINT ...] --out probe.json
"""

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

from nanovision.data import shapes

ATTRIBUTES = {"color": list(shapes.COLORS), "shape": list(shapes.SHAPES)}


def image_tokens_and_labels(model, processor, num_scenes, split, batch_size=100):
    """Flattened image tokens [num_scenes, tokens * hidden] and, per attribute, labels [num_scenes, places]
    (0: no object there, else 1 + the attribute's index)."""
    size = model.config.vision_config.image_size
    features, labels = [], {name: [] for name in ATTRIBUTES}
    for start in range(0, num_scenes, batch_size):
        scenes = [shapes.random_scene(random.Random(f"image-token-probe-{split}-{i}"))
                  for i in range(start, min(num_scenes, start + batch_size))]
        pixels = processor.image_processor([shapes.render_scene(s, size) for s in scenes],
                                           return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features.append(model.get_image_features(pixels).pooler_output.float().flatten(1))
        for scene in scenes:
            by_place = {obj["position"]: obj for obj in scene["objects"]}
            for name, values in ATTRIBUTES.items():
                labels[name].append([values.index(by_place[p][name]) + 1 if p in by_place else 0
                                     for p in shapes.POSITIONS])
    return torch.cat(features), {name: torch.tensor(rows) for name, rows in labels.items()}


def probe_accuracy(x_train, y_train, x_test, y_test, classes, steps=300):
    """Held-out accuracy of a softmax regression, counted where the place holds an object."""
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x_train @ weight + bias, y_train) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    present = y_test > 0
    return ((x_test @ weight + bias).argmax(-1)[present] == y_test[present]).float().mean().item()


def probe_checkpoint(path, num_train=3000, num_test=600):
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    x_train, y_train = image_tokens_and_labels(model, processor, num_train, "train")
    x_test, y_test = image_tokens_and_labels(model, processor, num_test, "test")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return {name: {place: probe_accuracy(x_train, y_train[name][:, i], x_test, y_test[name][:, i], len(values) + 1)
                   for i, place in enumerate(shapes.POSITIONS)}
            for name, values in ATTRIBUTES.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", default="image_token_probe.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    print(f"{'checkpoint':50s} " + " ".join(f"{n} {p:6s}" for n in ATTRIBUTES for p in shapes.POSITIONS))
    for path in args.checkpoints:
        results[path] = probe_checkpoint(path)
        print(f"{path[-50:]:50s} " + " ".join(f"{results[path][n][p]:{len(n) + 7}.3f}" for n in ATTRIBUTES
                                               for p in shapes.POSITIONS))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
