"""Image processor and multimodal processor for nanovision.

Shipped as Hub remote code (``trust_remote_code=True``), so it imports only from the standard library, numpy, PIL,
torch and transformers -- never from ``nanovision``.

* :class:`NanoVisionImageProcessor` is transformers' SigLIP PIL image processor (bicubic resize to ``size``, rescale
  by 1/255, normalize with mean/std 0.5) behind one input path, `to_rgb_pil`, which turns every accepted input
  (PIL image of any mode, numpy/torch array, file path, URL, data URI, bytes) into an RGB PIL image or raises an
  error naming the input (``images[1][0]``) and what is wrong with it.
* :class:`NanoVisionProcessor` is a `ProcessorMixin` whose only model-specific parts are the placeholder expansion
  (`replace_image_token`: each ``<image>`` becomes ``<|image_start|>`` + ``<image>`` * ``num_image_tokens`` +
  ``<|image_end|>``), the token count vLLM asks for, and the input checks.
"""

import base64
import io
import os
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin

# Modes whose transparency is composited on white (premultiplied "La" has no PIL converter and is done by hand).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def open_image(source, where: str = "image") -> PIL.Image.Image:
    """Open a file path, an http(s) URL, a ``data:image/...;base64,`` URI or encoded image bytes, EXIF-rotated.

    transformers' `load_image` converts to RGB as it opens, which drops transparency to black; the caller of this
    function converts with `pil_to_rgb` instead, so a file, a data URI and a PIL image give the same pixels.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "image bytes"
    elif isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{where}: only base64 data URIs are supported, got one starting {header[:60]!r}")
        try:
            data, name = base64.b64decode(payload), "data URI"
        except ValueError as err:
            raise ValueError(f"{where}: invalid base64 in data URI: {err}") from err
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:  # noqa: S310 - explicit http(s) only
                data, name = response.read(), f"URL {source!r}"
        except Exception as err:
            raise ValueError(f"{where}: could not download image {source!r}: {err}") from err
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where}: image file not found: {path[:300]!r}")
        if os.path.isdir(path):
            raise ValueError(f"{where}: expected an image file but {path!r} is a directory")
        with open(path, "rb") as file:
            data, name = file.read(), f"image file {path!r}"
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many exception types for bad data
        raise ValueError(f"{where}: could not decode {name} (unreadable or corrupt): {type(err).__name__}: {err}") from err
    return PIL.ImageOps.exif_transpose(image)


def to_uint8(array: np.ndarray, where: str = "image") -> np.ndarray:
    """Floats in [0, 1] are scaled by 255, other floats read as 0..255; bool is 0/255; integers are 8-bit unless
    16-bit (uint16, or wider types with values above 255), which are scaled by 255/65535."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: image contains NaN or infinite values")
        if array.size and array.min() >= 0.0 and array.max() <= 1.0:
            array = array * 255.0
    elif np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.uint16) or (array.dtype.itemsize > 2 and array.size and array.max() > 255):
            array = array / 257.0
    else:
        raise ValueError(f"{where}: unsupported image array dtype {array.dtype}")
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def pil_to_rgb(image: PIL.Image.Image, where: str = "image") -> PIL.Image.Image:
    """Convert a PIL image of any mode to RGB: transparency is composited on white, 16-bit and float grayscale is
    scaled (PIL's own conversion clips it)."""
    try:
        image.load()
    except Exception as err:
        raise ValueError(f"{where}: could not load PIL image data: {type(err).__name__}: {err}") from err
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: empty image (width={image.width}, height={image.height})")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return PIL.Image.fromarray(to_uint8(np.asarray(image), where)).convert("RGB")
    if mode == "La":  # premultiplied: white shows through by (1 - alpha)
        gray, alpha = np.moveaxis(np.asarray(image).astype(np.float64), -1, 0)
        return PIL.Image.fromarray(np.clip(np.rint(gray + 255.0 - alpha), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ALPHA_MODES or "transparency" in image.info:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"{where}: cannot convert a PIL image of mode {mode!r} to RGB: {err}") from err


def to_rgb_pil(image, where: str = "image", input_data_format=None) -> PIL.Image.Image:
    """The one path every image input takes: an RGB ``PIL.Image``, or an error that names ``where`` and the problem.

    Accepts a ``PIL.Image`` (any mode), a numpy array or torch tensor (HW, HWC or CHW with 1, 3 or 4 channels, 4 being
    RGBA; any int, bool or float dtype, see `to_uint8`), a file path, an http(s) URL, a base64 ``data:`` URI or
    encoded bytes. ``input_data_format`` ("channels_first" / "channels_last") fixes the layout of a 3-D array; without
    it numpy arrays are read channels-last and torch tensors channels-first, unless only the other layout fits.
    """
    channels_first = None
    if input_data_format is not None:
        layout = str(getattr(input_data_format, "value", input_data_format))
        if layout not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {layout!r}")
        channels_first = layout == "channels_first"
    if image is None:
        raise ValueError(f"{where} is None; expected an image")
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = open_image(image, where)
    if isinstance(image, PIL.Image.Image):
        return pil_to_rgb(image, where)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
        if channels_first is None and image.ndim == 3:
            channels_first = image.shape[0] in (1, 3, 4) or image.shape[-1] not in (1, 3, 4)
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{where}: unsupported image type {type(image).__name__}; expected a PIL.Image, numpy array, torch "
            "tensor, file path, URL, data URI or bytes"
        )
    shape = tuple(image.shape)
    if image.ndim == 3:
        if channels_first is None:
            channels_first = shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4)
        if channels_first:
            image = np.moveaxis(image, 0, -1)
        if image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{where}: expected 1, 3 or 4 channels, got an array of shape {shape} "
                f"(read as {'CHW' if channels_first else 'HWC'})"
            )
        image = image[..., 0] if image.shape[-1] == 1 else image
    elif image.ndim != 2:
        raise ValueError(f"{where}: expected a 2D (H, W) or 3D (H, W, C) / (C, H, W) image array, got {image.ndim}D "
                         f"with shape {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: empty image (height={image.shape[0]}, width={image.shape[1]})")
    return pil_to_rgb(PIL.Image.fromarray(np.ascontiguousarray(to_uint8(image, where))), where)


class NanoVisionImageProcessor(SiglipImageProcessorPil):
    r"""SigLIP's PIL image processor (bicubic resize to ``size``, 224x224 by default; rescale by 1/255; normalize with
    mean and std 0.5, so pixels end up in [-1, 1]), with every input converted by `to_rgb_pil` first.

    Call it with one image, a list of images, or a list of lists (one per text); ``pixel_values`` holds every image in
    order, ``[num_images, 3, H, W]`` float32 (numpy, or torch with ``return_tensors="pt"``).
    """

    def fetch_images(self, images, input_data_format=None):
        """``images`` as RGB PIL images: a flat list, or a list of lists when ``images`` holds lists (an image
        beside them is a list of one). An empty input is an error: pass ``images=None`` instead."""
        if not isinstance(images, (list, tuple)):
            return [to_rgb_pil(images, "images", input_data_format)]
        if not any(isinstance(item, (list, tuple)) for item in images):
            rgb = [to_rgb_pil(image, f"images[{i}]", input_data_format) for i, image in enumerate(images)]
            count = len(rgb)
        else:
            rgb = [
                [to_rgb_pil(image, f"images[{i}][{j}]", input_data_format) for j, image in enumerate(item)]
                if isinstance(item, (list, tuple)) else [to_rgb_pil(item, f"images[{i}]", input_data_format)]
                for i, item in enumerate(images)
            ]
            count = sum(map(len, rgb))
        if not count:
            raise ValueError("images: no images were given (an empty list); pass at least one image, or images=None")
        return rgb

    def preprocess(self, images, input_data_format=None, **kwargs) -> BatchFeature:
        # The layout applies to the raw arrays; the images the base class then sees are PIL.
        return super().preprocess(self.fetch_images(images, input_data_format), **kwargs)

    def _preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        pixel_values = super()._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]
        if len({value.shape for value in pixel_values}) == 1:  # differs only with do_resize=False
            pixel_values = np.stack(pixel_values)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


class NanoVisionProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {
        "text_kwargs": {"padding": False, "return_mm_token_type_ids": False, "return_text_replacement_offsets": False},
    }


class NanoVisionProcessor(ProcessorMixin):
    r"""Processor combining :class:`NanoVisionImageProcessor` and the nanovision tokenizer.

    Args:
        image_processor: a `NanoVisionImageProcessor`.
        tokenizer: the nanovision tokenizer, which names ``image_token``, ``image_start_token`` and
            ``image_end_token`` (``<image>``, ``<|image_start|>``, ``<|image_end|>``), each one special token.
        num_image_tokens (`int`, defaults to 64): LM positions each image fills (the model config's
            ``num_image_tokens``).
        chat_template (`str`, *optional*): defaults to the tokenizer's chat template.

    ``__call__(images=None, text=None, **kwargs)`` (ProcessorMixin's) returns ``input_ids``, ``attention_mask`` and,
    with images, ``pixel_values`` (all images of the batch, in placeholder order); ``return_mm_token_type_ids``
    (1 on image, image-start and image-end tokens) and ``return_text_replacement_offsets`` add those outputs.
    ``images`` is one image, a flat list (one per placeholder, in order over the batch) or one list per text.
    """

    valid_processor_kwargs = NanoVisionProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 64, chat_template=None, **kwargs):
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be an int >= 1 (the model config's), got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens
        for name in ("image_token", "image_start_token", "image_end_token"):
            token = getattr(tokenizer, name, None)
            ids = tokenizer.encode(token, add_special_tokens=False) if isinstance(token, str) else []
            if len(ids) != 1:
                raise ValueError(
                    f"The tokenizer must name a {name} that encodes to one special token (got {token!r} -> {ids}); "
                    "use the nanovision tokenizer (nanovision.tokenizer.train_tokenizer)."
                )
            setattr(self, name, token)
            setattr(self, f"{name}_id", ids[0])
        # The ids `mm_token_type_ids` marks as image, and that `_get_num_multimodal_tokens` counts.
        self.image_token_ids = [self.image_token_id, self.image_start_token_id, self.image_end_token_id]
        chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs=None, image_idx: int = 0, **kwargs) -> str:
        """What each ``<image>`` placeholder expands to (the same for every image); training data uses it too."""
        return self.image_start_token + self.image_token * self.num_image_tokens + self.image_end_token

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if videos is not None or audio is not None:
            raise ValueError(f"{type(self).__name__} takes images and text only; got videos/audio")
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            if not isinstance(texts, (list, tuple)) or not texts:
                got = f"an empty {type(text).__name__}" if isinstance(texts, (list, tuple)) else type(text).__name__
                raise TypeError(f"text must be a str or a non-empty list of str (one per sample), got {got}; "
                                "apply_chat_template renders messages into such text")
            for index, sample in enumerate(texts):
                name = "text" if isinstance(text, str) else f"text[{index}]"
                if not isinstance(sample, str):
                    raise TypeError(f"{name} must be a str, got {type(sample).__name__} (text is a str or a list of "
                                    "str, one per sample)")
                if not sample:
                    raise ValueError(f"{name} is empty; every sample needs some text")
        return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """One image per ``<image>`` placeholder, per text when ``images`` has one list per text."""
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if text is None:
            return
        counts = [sample.count(self.image_token) for sample in text]
        per_text = images is not None and isinstance(images[0], list)
        if not per_text and len(text) > 1:
            given = 0 if images is None else len(images)
            if given != sum(counts):
                raise ValueError(
                    f"The {len(text)} texts contain {sum(counts)} '{self.image_token}' placeholder(s) in total "
                    f"(per text: {counts}) but {given} image(s) were given"
                )
            return
        given = [len(sample) for sample in images] if per_text else [0 if images is None else len(images)]
        if len(given) != len(text):
            raise ValueError(f"Got {len(given)} lists of images for {len(text)} text(s); pass one list per text")
        for index, (count, num_images) in enumerate(zip(counts, given)):
            if count != num_images:
                where = f"Sample {index}" if len(text) > 1 else "The text"
                raise ValueError(
                    f"{where} contains {count} '{self.image_token}' placeholder(s) but {num_images} image(s) were "
                    f"given for it (sample {index} of a batch of {len(text)}); the number of images must equal the "
                    "number of placeholders"
                )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """LM positions each image takes (used by vLLM): every image is resized to one size, so the count does not
        depend on ``image_sizes``. It counts the whole `replace_image_token` expansion, start and end markers
        included (as InternVL and Chameleon do), i.e. the positions ``mm_token_type_ids`` marks; only the ``<image>``
        positions among them carry image embeddings."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.num_image_tokens + 2] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids, one sequence or a batch, into a list of strings."""
        decoded = super().post_process_image_text_to_text(generated_outputs, skip_special_tokens, **kwargs)
        return [decoded] if isinstance(decoded, str) else decoded


__all__ = ["NanoVisionImageProcessor", "NanoVisionProcessor"]
