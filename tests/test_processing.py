"""Tests for nanovision.processing_nanovision (tiny tokenizer + images built in-test, CPU, no downloads)."""

import base64
import io
import json
import pathlib
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image


from conftest import run_without_nanovision
from transformers import BatchFeature
from transformers.processing_utils import MultiModalData

from nanovision.processing_nanovision import NanoVisionImageProcessor, NanoVisionProcessor
from nanovision.tokenizer import train_tokenizer

N_TOKENS = 5  # image tokens per image in these tests
SIZE = 16  # processor output resolution in these tests
IMAGE_ID, START_ID, END_ID = 6, 7, 8


def make_corpus(n=300, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "zu", "an", "el", "or"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(100)]
    words += ["the", "a", "cat", "dog", "image", "picture", "of", "with", "and", "is", "red", "blue"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_corpus(), vocab_size=500)


@pytest.fixture(scope="module")
def image_processor():
    return NanoVisionImageProcessor(size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def processor(tokenizer, image_processor):
    return NanoVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=N_TOKENS)


def rgb_array(height=10, width=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def solid(color, size=(7, 5)):
    return Image.new("RGB", size, color)


def pixels(image_processor, images, **kwargs):
    return image_processor(images, **kwargs)["pixel_values"]


# ------------------------------------------------------------------------------- image processor


def test_defaults_and_output_format():
    ip = NanoVisionImageProcessor()
    assert ip.size == {"height": 224, "width": 224}
    assert ip.resample == int(Image.Resampling.BICUBIC)
    assert list(ip.image_mean) == [0.5, 0.5, 0.5] and list(ip.image_std) == [0.5, 0.5, 0.5]  # tuples in transformers
    assert ip.model_input_names == ["pixel_values"]
    out = ip([solid((255, 255, 255)), solid((0, 0, 0))])
    assert isinstance(out, BatchFeature)
    values = out["pixel_values"]
    assert values.shape == (2, 3, 224, 224) and values.dtype == np.float32
    np.testing.assert_allclose(values[0], 1.0)
    np.testing.assert_allclose(values[1], -1.0)
    pt = ip(solid((255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == (1, 3, 224, 224)
    assert pt[0, 0].eq(1.0).all() and pt[0, 1].eq(-1.0).all() and pt[0, 2].eq(-1.0).all()


def test_resize_rescale_normalize_match_reference(image_processor):
    array = rgb_array(30, 20, seed=3)
    expected = np.asarray(Image.fromarray(array).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32)
    expected = ((expected / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels(image_processor, array)[0], expected, atol=1e-6)
    raw = pixels(image_processor, array, do_resize=False, do_normalize=False)
    np.testing.assert_allclose(raw[0], array.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_all_input_types_give_identical_pixels(image_processor, tmp_path):
    array = rgb_array()
    png = tmp_path / "img.png"
    Image.fromarray(array).save(png)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    inputs = {
        "pil": Image.fromarray(array),
        "numpy_hwc_uint8": array,
        "numpy_hwc_float01": array.astype(np.float32) / 255.0,
        "numpy_hwc_float255": array.astype(np.float64),  # max > 1 -> read as 0..255
        "numpy_chw": np.ascontiguousarray(array.transpose(2, 0, 1)),
        "torch_chw_uint8": torch.from_numpy(array).permute(2, 0, 1),
        "torch_hwc_uint8": torch.from_numpy(array),
        "torch_chw_float": torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,
        "torch_bf16": (torch.from_numpy(array).permute(2, 0, 1).float()).to(torch.bfloat16),
        "path_str": str(png),
        "path_pathlib": pathlib.Path(png),
        "bytes": buffer.getvalue(),
        "data_uri": data_uri,
    }
    reference = pixels(image_processor, inputs["pil"])
    for name, image in inputs.items():
        if name == "torch_bf16":  # bf16 cannot hold every uint8 value exactly; just check it runs
            assert pixels(image_processor, image).shape == reference.shape
            continue
        np.testing.assert_array_equal(pixels(image_processor, image), reference, err_msg=name)
    # flat list and nested per-sample lists keep order and are concatenated
    batch = pixels(image_processor, [[inputs["pil"], solid((0, 0, 0))], [str(png)]])
    assert batch.shape == (3, 3, SIZE, SIZE)
    np.testing.assert_array_equal(batch[0], reference[0])
    np.testing.assert_array_equal(batch[2], reference[0])
    np.testing.assert_allclose(batch[1], -1.0)


def test_grayscale_inputs(image_processor):
    gray = np.random.default_rng(1).integers(0, 256, size=(9, 11), dtype=np.uint8)
    reference = pixels(image_processor, Image.fromarray(gray, mode="L").convert("RGB"))
    for image in (gray, gray[..., None], gray[None], torch.from_numpy(gray), Image.fromarray(gray, mode="L")):
        np.testing.assert_array_equal(pixels(image_processor, image), reference)
    # uint16 grayscale arrays are scaled, not clipped
    white16 = np.full((4, 4), 65535, dtype=np.uint16)
    np.testing.assert_allclose(pixels(image_processor, white16), 1.0)


def test_sixteen_bit_inputs_are_scaled(image_processor):
    # 16-bit data is scaled by 255/65535 even when dark (257 -> 1/255)
    for image in (np.full((4, 4), 257, dtype=np.uint16), Image.new("I;16", (4, 4), 257)):
        values = pixels(image_processor, image, do_normalize=False)
        np.testing.assert_allclose(values, 1 / 255, atol=1e-6)


def _pil(mode, value, size=(6, 4)):
    return Image.new(mode, size, value)


WHITE_CASES = {
    "1": lambda: _pil("1", 1),
    "L": lambda: _pil("L", 255),
    "LA_transparent": lambda: _pil("LA", (0, 0)),
    "LA_opaque": lambda: _pil("LA", (255, 255)),
    "RGBA_transparent": lambda: _pil("RGBA", (0, 0, 0, 0)),
    "RGBA_opaque": lambda: _pil("RGBA", (255, 255, 255, 255)),
    "RGBa": lambda: _pil("RGBa", (0, 0, 0, 0)),
    "CMYK": lambda: _pil("CMYK", (0, 0, 0, 0)),
    "YCbCr": lambda: _pil("YCbCr", (255, 128, 128)),
    "I": lambda: _pil("I", 65535),
    "I_8bit": lambda: _pil("I", 255),
    "I;16": lambda: _pil("I;16", 65535),
    "I;16B": lambda: _pil("I;16B", 65535),
    "La_transparent": lambda: _pil("La", (0, 0)),
    "F": lambda: _pil("F", 1.0),
    "RGBX": lambda: _pil("RGBX", (255, 255, 255, 0)),
    "HSV": lambda: _pil("HSV", (0, 0, 255)),
}


def _palette_image(transparent):
    image = Image.new("P", (6, 4), 0)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    if transparent:
        image.info["transparency"] = 0
    else:
        image.paste(1, (0, 0, 6, 4))
    return image


WHITE_CASES["P_opaque_white"] = lambda: _palette_image(False)
WHITE_CASES["P_transparent"] = lambda: _palette_image(True)
WHITE_CASES["PA_transparent"] = lambda: Image.new("PA", (6, 4), (0, 0))


@pytest.mark.parametrize("case", sorted(WHITE_CASES))
def test_pil_modes_convert_to_white(image_processor, case):
    image = WHITE_CASES[case]()
    values = pixels(image_processor, image)
    assert values.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(values, 1.0, atol=1e-2, err_msg=f"{case} ({image.mode})")


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "I", "I;16", "F", "LA", "RGBA", "YCbCr"])
def test_pil_modes_black(image_processor, mode):
    value = {"LA": (0, 255), "RGBA": (0, 0, 0, 255), "CMYK": (0, 0, 0, 255), "YCbCr": (0, 128, 128)}.get(mode, 0)
    image = Image.new(mode, (5, 5), value)
    np.testing.assert_allclose(pixels(image_processor, image), -1.0, atol=1e-2, err_msg=mode)


def test_half_transparent_red_on_white(image_processor):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    values = pixels(image_processor, image, do_normalize=False)[0]
    np.testing.assert_allclose(values[0], 1.0)
    np.testing.assert_allclose(values[1], 127 / 255, atol=2 / 255)
    rgba_array = np.zeros((4, 4, 4), dtype=np.uint8)  # 4-channel arrays are RGBA too
    np.testing.assert_allclose(pixels(image_processor, rgba_array), 1.0)


def test_saved_file_modes(image_processor, tmp_path):
    cases = {
        "gray16.png": Image.fromarray(np.full((5, 5), 65535, dtype=np.uint16)),
        "palette.gif": _palette_image(False),
        "rgba.png": Image.new("RGBA", (5, 5), (0, 0, 0, 0)),
        "cmyk.jpg": Image.new("CMYK", (5, 5), (0, 0, 0, 0)),
    }
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path)
        np.testing.assert_allclose(pixels(image_processor, path), 1.0, atol=2e-2, err_msg=name)


def test_unreadable_file_error_names_path(image_processor, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="corrupt.png") as info:
        image_processor([solid((1, 2, 3)), str(bad)])
    assert str(bad) in str(info.value) and "images[1]" in str(info.value)
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(rgb_array(40, 40)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        image_processor(truncated)


def test_missing_file_and_directory(image_processor, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        image_processor(str(missing))
    with pytest.raises(ValueError, match="directory"):
        image_processor(tmp_path)


def test_empty_image_errors(image_processor):
    with pytest.raises(ValueError, match="empty image"):
        image_processor(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images\[1\].*empty image"):
        image_processor([solid((0, 0, 0)), Image.new("RGB", (0, 4))])
    with pytest.raises(ValueError, match="empty image"):
        image_processor(torch.zeros(3, 4, 0))
    with pytest.raises(ValueError, match="no images"):
        image_processor([])


def test_bad_array_errors(image_processor):
    with pytest.raises(ValueError, match=r"images\[0\].*4D"):
        image_processor([np.zeros((2, 3, 4, 5), dtype=np.uint8)])
    with pytest.raises(ValueError, match="1D"):
        image_processor(np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        image_processor(np.zeros((6, 6, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        image_processor(np.full((4, 4, 3), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match=r"images\[1\].*unsupported image type int"):
        image_processor([solid((0, 0, 0)), 42])
    with pytest.raises(ValueError, match=r"images\[0\]\[1\] is None"):
        image_processor([[solid((0, 0, 0)), None]])


def test_image_processor_save_load(tmp_path):
    ip = NanoVisionImageProcessor(size={"height": 20, "width": 12}, image_mean=[0.1, 0.2, 0.3], image_std=0.25)
    ip.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = NanoVisionImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == ip.to_dict()
    image = rgb_array(9, 9)
    np.testing.assert_array_equal(loaded(image)["pixel_values"], ip(image)["pixel_values"])
    assert loaded(image)["pixel_values"].shape == (1, 3, 20, 12)


# ------------------------------------------------------------------------------------- processor


def image_block():
    return [START_ID] + [IMAGE_ID] * N_TOKENS + [END_ID]


def test_processor_attributes(processor):
    assert processor.image_token == "<image>" and processor.image_token_id == IMAGE_ID
    assert processor.image_start_token == "<|image_start|>" and processor.image_start_token_id == START_ID
    assert processor.image_end_token == "<|image_end|>" and processor.image_end_token_id == END_ID
    assert processor.num_image_tokens == N_TOKENS
    assert processor.chat_template == processor.tokenizer.chat_template
    assert set(processor.model_input_names) == {"input_ids", "attention_mask", "pixel_values"}


def test_expansion_exact_image_token_count(processor):
    out = processor(text="a cat <image> and <image> dog", images=[solid((255, 0, 0)), rgb_array()])
    ids = out["input_ids"][0]
    assert ids.count(IMAGE_ID) == 2 * N_TOKENS
    assert ids.count(START_ID) == 2 and ids.count(END_ID) == 2
    first = ids.index(START_ID)
    assert ids[first : first + N_TOKENS + 2] == image_block()
    assert out["pixel_values"].shape == (2, 3, SIZE, SIZE)
    text_only = processor.tokenizer("a cat ", add_special_tokens=False)["input_ids"]
    assert ids[: len(text_only)] == text_only
    assert "pixel_values" not in processor(text="no images here")


def test_placeholder_count_mismatch(processor):
    with pytest.raises(ValueError, match=r"contains 2 '<image>' placeholder\(s\) but 1 image") as info:
        processor(text="<image> x <image>", images=[solid((0, 0, 0))])
    assert "2" in str(info.value) and "1" in str(info.value)
    with pytest.raises(ValueError, match=r"contains 1 '<image>' placeholder\(s\) but 0 image"):
        processor(text="<image> x")
    with pytest.raises(ValueError, match=r"Sample 1 contains 0 '<image>' placeholder\(s\) but 1 image"):
        processor(text=["<image>", "none"], images=[[solid((0, 0, 0))], [solid((0, 0, 0))]])
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) in total.*but 3 image"):
        processor(text=["<image>", "<image>"], images=[solid((0, 0, 0))] * 3)


def test_processor_errors_name_sample_and_image(processor, tmp_path):
    with pytest.raises(TypeError, match=r"images\[1\]\[0\]"):
        processor(text=["<image>", "<image>"], images=[[solid((0, 0, 0))], [42]])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"images\[1\].*bad\.jpg"):
        processor(text="<image><image>", images=[solid((0, 0, 0)), str(bad)])


def test_batch_left_padding_and_image_order(processor):
    red, green, blue = solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))
    texts = ["<image> short", "a much longer text <image> with <image> two images in it"]
    out = processor(text=texts, images=[[red], [green, blue]], padding=True, padding_side="left",
                    return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and mask[0, :n_pad].eq(0).all() and mask[0, n_pad:].eq(1).all()
    assert ids[0, :n_pad].eq(processor.tokenizer.pad_token_id).all()
    assert mask[1].eq(1).all()
    assert ids[0, n_pad : n_pad + N_TOKENS + 2].tolist() == image_block()
    assert (ids == IMAGE_ID).sum(dim=1).tolist() == [N_TOKENS, 2 * N_TOKENS]
    pv = out["pixel_values"]
    assert pv.shape == (3, 3, SIZE, SIZE)
    assert [int(pv[i].mean(dim=(1, 2)).argmax()) for i in range(3)] == [0, 1, 2]  # red, green, blue
    # a flat list is distributed over the texts in placeholder order; default right padding
    flat = processor(text=texts, images=[red, green, blue], padding=True, return_tensors="pt")
    assert torch.equal(flat["pixel_values"], pv)
    assert flat["attention_mask"][0, -1] == 0 and flat["attention_mask"][0, 0] == 1


def test_images_only_and_no_input(processor):
    out = processor(images=[solid((0, 0, 0)), solid((255, 255, 255))], return_tensors="pt")
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="provide"):
        processor()


BAD_TEXTS = {
    "int": (5, TypeError, r"text must be a str or a non-empty list of str.*got int"),
    "float": (1.5, TypeError, r"got float"),
    "dict": ({"text": "<image>"}, TypeError, r"got dict"),
    "bytes": (b"<image>", TypeError, r"got bytes"),
    "empty_list": ([], TypeError, r"got an empty list"),
    "list_of_lists": ([["a cat"]], TypeError, r"text\[0\] must be a str, got list"),
    "none_in_list": (["a cat", None], TypeError, r"text\[1\] must be a str, got NoneType"),
    "token_ids": ([[1, 2, 3]], TypeError, r"text\[0\] must be a str"),
    "empty_str": ("", ValueError, r"text is empty"),
    "empty_in_batch": (["a cat", ""], ValueError, r"text\[1\] is empty"),
}


@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_TEXTS))
def test_bad_text_names_the_argument(processor, case, with_images):
    text, error, pattern = BAD_TEXTS[case]
    images = [solid((0, 0, 0))] if with_images else None
    with pytest.raises(error, match=pattern):
        processor(text=text, images=images)


BAD_IMAGES = {
    "nan_float": (np.full((4, 4, 3), np.nan, dtype=np.float32), ValueError, "NaN or infinite"),
    "inf_float": (np.full((4, 4), np.inf), ValueError, "NaN or infinite"),
    "nan_tensor": (torch.full((3, 4, 4), float("nan")), ValueError, "NaN or infinite"),
    "two_channels": (np.zeros((6, 6, 2), dtype=np.uint8), ValueError, "1, 3 or 4 channels"),
    "five_channels_chw": (torch.zeros(5, 6, 7), ValueError, "1, 3 or 4 channels"),
    "one_d": (np.zeros(5, dtype=np.uint8), ValueError, "1D"),
    "four_d": (np.zeros((2, 3, 4, 5), dtype=np.uint8), ValueError, "4D"),
    "zero_size": (np.zeros((0, 5, 3), dtype=np.uint8), ValueError, "empty image"),
    "complex_dtype": (np.zeros((4, 4), dtype=np.complex64), ValueError, "dtype complex64"),
    "string_dtype": (np.array([["a", "b"], ["c", "d"]]), ValueError, "dtype <U1"),
    "int": (42, TypeError, "unsupported image type int"),
    "dict": ({"url": "x.png"}, TypeError, "unsupported image type dict"),
    "object": (object(), TypeError, "unsupported image type object"),
    "none": (None, ValueError, "is None"),
    "not_a_path": ("no/such/picture.png", FileNotFoundError, "no/such/picture.png"),
    "not_base64": ("data:image/png;base64,@@@@", ValueError, "data URI"),
    "bytes_not_an_image": (b"hello", ValueError, "could not decode image bytes"),
}


@pytest.mark.parametrize("entry", ["image_processor", "processor", "processor_per_text"])
@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_name_the_image_on_every_entry_point(processor, case, entry):
    image, error, pattern = BAD_IMAGES[case]
    good = solid((0, 0, 0))
    # the bad image is the second one: the message must name which
    if entry == "image_processor":
        call, where = lambda: processor.image_processor([good, image]), r"images\[1\]"
    elif entry == "processor":
        call, where = lambda: processor(text="<image> and <image>", images=[good, image]), r"images\[1\]"
    else:
        call, where = lambda: processor(text=["<image>", "<image>"], images=[[good], [image]]), r"images\[1\]\[0\]"
    with pytest.raises(error, match=pattern) as info:
        call()
    assert re.search(where, str(info.value)), str(info.value)


@pytest.mark.parametrize("images", [[], (), [[]], [[], []]], ids=["list", "tuple", "nested", "nested_two"])
def test_empty_image_lists_are_an_error(processor, images):
    with pytest.raises(ValueError, match="no images were given"):
        processor.image_processor(images)
    with pytest.raises(ValueError, match="no images were given.*images=None"):
        processor(text=["no image"] * max(1, len(images)), images=images)


def test_videos_and_audio_are_refused(processor):
    with pytest.raises(ValueError, match="images and text only"):
        processor(text="a cat", videos=[np.zeros((2, 4, 4, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="images and text only"):
        processor(text="a cat", audio=np.zeros(16000))


def test_truncation_into_image_raises(processor):
    with pytest.raises(ValueError, match="truncation"):
        processor(text="hello <image>", images=[solid((0, 0, 0))], truncation=True, max_length=4)


def test_mm_token_type_ids_and_replacement_offsets(processor):
    text = "x <image> y <image>"
    out = processor(text=text, images=[solid((0, 0, 0))] * 2, return_mm_token_type_ids=True,
                    return_text_replacement_offsets=True, return_tensors="pt")
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    assert types.tolist() == [int(t in (IMAGE_ID, START_ID, END_ID)) for t in ids.tolist()]
    offsets = out["text_replacement_offsets"][0]
    assert [entry["span"] for entry in offsets] == [(2, 9), (12, 19)]
    replacement = "<|image_start|>" + "<image>" * N_TOKENS + "<|image_end|>"
    assert all(entry["replacement"] == replacement and entry["type"] == "image" for entry in offsets)
    assert processor.tokenizer.encode(replacement) == image_block()
    # new_span points into the expanded text
    expanded = text.replace("<image>", replacement)
    assert [expanded[slice(*entry["new_span"])] for entry in offsets] == [replacement, replacement]


def test_get_num_multimodal_tokens(processor):
    data = processor._get_num_multimodal_tokens(image_sizes=[(10, 20), (300, 40), (1, 1)])
    assert isinstance(data, MultiModalData)
    # markers included: equals the positions mm_token_type_ids marks and the replacement length
    assert data["num_image_tokens"] == [N_TOKENS + 2] * 3
    assert data["num_image_patches"] == [1, 1, 1]
    out = processor(text="<image><image>", images=[rgb_array()] * 2, return_mm_token_type_ids=True)
    assert sum(out["mm_token_type_ids"][0]) == sum(data["num_image_tokens"][:2])
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()


def test_processor_apply_chat_template(processor, tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(rgb_array(20, 20)).save(path)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": solid((255, 0, 0))},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red cat."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "path": str(path)}]},
        {"role": "assistant", "content": "A dog."},
    ]
    prompt = processor.apply_chat_template(messages)
    assert prompt == processor.tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt.count("<image>") == 2
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    assert ids.count(IMAGE_ID) == 2 * N_TOKENS and ids.count(processor.tokenizer.bos_token_id) == 1
    assert out["pixel_values"].shape == (2, 3, SIZE, SIZE)
    masked = processor.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "A red cat.<|end|>A dog.<|end|>"


def test_decode_and_post_process(processor):
    ids = processor.tokenizer.encode("<|assistant|>A cat.<|end|>")
    assert processor.decode(ids) == "<|assistant|>A cat.<|end|>"
    assert processor.decode(ids, skip_special_tokens=True) == "A cat."
    assert processor.batch_decode([ids, ids], skip_special_tokens=True) == ["A cat.", "A cat."]
    assert processor.post_process_image_text_to_text(torch.tensor([ids])) == ["A cat."]
    assert processor.post_process_image_text_to_text(ids, skip_special_tokens=False) == [
        "<|assistant|>A cat.<|end|>"
    ]


def test_processor_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists()
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_image_tokens"] == N_TOKENS
    loaded = NanoVisionProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, NanoVisionImageProcessor)
    assert loaded.num_image_tokens == N_TOKENS
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert NanoVisionProcessor.from_pretrained(tmp_path, num_image_tokens=3).num_image_tokens == 3
    images = [[rgb_array()], [rgb_array(seed=1), solid((1, 2, 3))]]
    kwargs = dict(text=["<image> hi", "two <image><image>"], images=images, padding=True, return_tensors="pt")
    a, b = processor(**kwargs), loaded(**kwargs)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_remote_code_load_without_nanovision(processor, tmp_path, monkeypatch, no_nanovision_env):
    monkeypatch.setattr(NanoVisionProcessor, "_auto_class", None)
    monkeypatch.setattr(NanoVisionImageProcessor, "_auto_class", None)
    NanoVisionProcessor.register_for_auto_class("AutoProcessor")
    NanoVisionImageProcessor.register_for_auto_class("AutoImageProcessor")
    folder = tmp_path / "checkpoint"
    processor.save_pretrained(folder)
    assert (folder / "processing_nanovision.py").exists()
    expected = processor(text="look <image>", images=[rgb_array()], return_tensors="np")
    np.save(tmp_path / "image.npy", rgb_array())
    code = f"""
import importlib.util, json
import numpy as np
try:
    import nanovision
except ImportError:
    pass
else:
    raise SystemExit("nanovision must not be importable here")
from transformers import AutoImageProcessor, AutoProcessor
processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
out = processor(text="look <image>", images=[np.load({str(tmp_path / 'image.npy')!r})], return_tensors="np")
print(json.dumps(dict(
    processor=type(processor).__name__, module=type(processor).__module__,
    image_processor=type(image_processor).__name__, num_image_tokens=processor.num_image_tokens,
    input_ids=out["input_ids"].tolist(), pixel_sum=float(out["pixel_values"].sum()),
    shape=list(out["pixel_values"].shape),
)))
"""
    stdout = run_without_nanovision(code, no_nanovision_env, cwd=tmp_path)
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["processor"] == "NanoVisionProcessor"
    assert result["module"].startswith("transformers_modules.")
    assert result["image_processor"] == "NanoVisionImageProcessor"
    assert result["num_image_tokens"] == N_TOKENS
    assert result["input_ids"] == expected["input_ids"].tolist()
    assert result["shape"] == list(expected["pixel_values"].shape)
    assert result["pixel_sum"] == pytest.approx(float(expected["pixel_values"].sum()), abs=1e-3)


def test_remote_code_file_is_self_contained():
    import ast

    import nanovision.processing_nanovision as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would not work as remote code"
            roots.add(node.module.split(".")[0])
    allowed = {"__future__", "base64", "io", "os", "re", "urllib", "collections", "typing", "numpy", "PIL",
               "transformers", "torch"}
    assert roots <= allowed, roots - allowed


def test_training_data_expands_images_as_the_processor_does(processor):
    from nanovision.training.data import IGNORE_INDEX, tokenize_caption, tokenize_conversation

    image = solid((255, 0, 0))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red cat."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A dog."},
    ]
    example = tokenize_conversation({"messages": messages, "images": [image, image]}, processor)
    with_images = [dict(m, content=[dict(part, image=image) if part["type"] == "image" else part for part in m["content"]])
                   if isinstance(m["content"], list) else m for m in messages]  # the processor takes them inline
    expected = processor.apply_chat_template(with_images, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    assert example["input_ids"] == expected["input_ids"][0]
    assert [label != IGNORE_INDEX for label in example["labels"]] == [bool(m) for m in expected["assistant_masks"][0]]
    caption = tokenize_caption({"caption": "a red cat", "image": image}, processor)
    prompt = processor.tokenizer.bos_token + processor.image_token + "a red cat" + processor.tokenizer.eos_token
    assert caption["input_ids"] == processor(text=prompt, images=[image])["input_ids"][0]
    assert caption["input_ids"].count(IMAGE_ID) == N_TOKENS
