"""Image processor and multimodal processor for nanovision.

This file is shipped as Hub remote code (``trust_remote_code=True``), so it imports only from the
standard library, numpy, PIL, torch and transformers -- never from ``nanovision``.

* :class:`NanoVisionImageProcessor` turns images (PIL, numpy, torch, file paths, ...) into
  ``pixel_values`` of shape ``[N, 3, H, W]`` (float32): RGB conversion, bicubic resize to a fixed
  size, rescale by 1/255 and normalize (SigLIP-style mean/std 0.5 by default). PIL + numpy only,
  torchvision is not needed.
* :class:`NanoVisionProcessor` combines it with the tokenizer. Every ``<image>`` placeholder in the
  text is expanded to ``<|image_start|>`` + ``<image>`` * ``num_image_tokens`` + ``<|image_end|>``
  before tokenization, so the model finds exactly ``num_image_tokens`` image-token ids to fill per
  image.
"""

from __future__ import annotations

import base64
import io
import os
import re
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

try:  # torch is optional for the image processor itself
    import torch
except ImportError:  # pragma: no cover - torch is installed wherever nanovision runs
    torch = None


logger = logging.get_logger(__name__)

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_START_TOKEN = "<|image_start|>"
DEFAULT_IMAGE_END_TOKEN = "<|image_end|>"

BICUBIC = int(PIL.Image.Resampling.BICUBIC)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_URL_PREFIXES = ("http://", "https://")


# --------------------------------------------------------------------------------------------------
# Image loading / conversion helpers
# --------------------------------------------------------------------------------------------------


def _describe(obj: Any) -> str:
    if isinstance(obj, (str, os.PathLike)):
        text = os.fspath(obj)
        return repr(text if len(text) <= 200 else text[:200] + "...")
    if isinstance(obj, np.ndarray) or (torch is not None and isinstance(obj, torch.Tensor)):
        return f"{type(obj).__name__}(shape={tuple(obj.shape)}, dtype={obj.dtype})"
    if isinstance(obj, PIL.Image.Image):
        return f"PIL.Image(mode={obj.mode}, size={obj.size})"
    return type(obj).__name__


def _open_image_bytes(data: bytes, where: str, source: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many different exception types for bad data
        raise ValueError(f"{where}: could not decode image from {source}: {type(err).__name__}: {err}") from err
    return PIL.ImageOps.exif_transpose(image)


def _load_image_source(source: str | os.PathLike, where: str) -> PIL.Image.Image:
    """Open a file path, an http(s) URL or a ``data:image/...;base64,`` URI."""
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ValueError(f"{where}: only base64 data URIs are supported, got {_describe(source)}")
        try:
            data = base64.b64decode(payload, validate=False)
        except Exception as err:
            raise ValueError(f"{where}: invalid base64 data URI: {err}") from err
        return _open_image_bytes(data, where, "data URI")
    if isinstance(source, str) and source.startswith(_URL_PREFIXES):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:  # noqa: S310 - explicit http(s) only
                data = response.read()
        except Exception as err:
            raise ValueError(f"{where}: could not download image {source!r}: {err}") from err
        return _open_image_bytes(data, where, f"URL {source!r}")

    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: image file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{where}: expected an image file but {path!r} is a directory")
    try:
        with PIL.Image.open(path) as opened:
            opened.load()
            image = opened.copy()  # detaches from the file; keeps mode, palette and info (EXIF)
    except Exception as err:
        raise ValueError(
            f"{where}: could not read image file {path!r} (unreadable or corrupt): {type(err).__name__}: {err}"
        ) from err
    return PIL.ImageOps.exif_transpose(image)


def _float_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: image contains NaN or infinite values")
    # Floating point images are taken to be in [0, 1] when they fit in it, otherwise in [0, 255].
    if array.size and array.min() >= 0.0 and array.max() <= 1.0:
        array = array * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _int_to_uint8(array: np.ndarray, sixteen_bit: bool | None = None) -> np.ndarray:
    """uint8 as is, bool as 0/255, 16-bit values scaled by 255/65535.

    ``sixteen_bit=None`` decides from the data type (uint16 is 16-bit) and, for wider integer types,
    from the values (16-bit when the maximum exceeds 255).
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if sixteen_bit is None:
        sixteen_bit = array.dtype == np.uint16 or (array.size > 0 and int(array.max()) > 255)
    if sixteen_bit:
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array, where)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return _int_to_uint8(array)
    raise ValueError(f"{where}: unsupported image array dtype {array.dtype}")


def _composite_on_white(rgba: PIL.Image.Image) -> PIL.Image.Image:
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def pil_to_rgb(image: PIL.Image.Image, where: str = "image") -> PIL.Image.Image:
    """Convert a PIL image of any mode to RGB; transparency is composited on a white background."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        # High bit depth grayscale: PIL's own conversion clips instead of scaling.
        array = np.asarray(image)
        if mode == "F":
            gray = _float_to_uint8(array, where)
        else:  # "I;16*" is 16-bit by definition; 32-bit "I" is read as 16-bit when its values exceed 255
            gray = _int_to_uint8(array.astype(np.int64), sixteen_bit=True if mode.startswith("I;16") else None)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "La":  # premultiplied luminance + alpha, PIL has no converter for it
        array = np.asarray(image).astype(np.float64)
        alpha = array[..., 1:2] / 255.0
        gray = array[..., 0:1] + (1.0 - alpha) * 255.0
        gray = np.clip(np.rint(gray[..., 0]), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except Exception as err:
        raise ValueError(f"{where}: cannot convert PIL image of mode {mode!r} to RGB: {err}") from err


def _array_to_pil(array: np.ndarray, where: str, channels_first: bool | None) -> PIL.Image.Image:
    """``array`` is HW, HWC or CHW with 1, 3 or 4 channels; 4 channels are RGBA."""
    if array.ndim == 2:
        layout = "HW"
    elif array.ndim == 3:
        first, last = array.shape[0], array.shape[-1]
        if channels_first is None:
            # numpy default is channels-last; fall back to channels-first when only that fits.
            channels_first = last not in (1, 3, 4) and first in (1, 3, 4)
        layout = "CHW" if channels_first else "HWC"
        channels = first if channels_first else last
        if channels not in (1, 3, 4):
            raise ValueError(
                f"{where}: expected 1, 3 or 4 channels, got an array of shape {tuple(array.shape)} "
                f"(interpreted as {layout})"
            )
        if channels_first:
            array = np.moveaxis(array, 0, -1)
    else:
        raise ValueError(
            f"{where}: expected a 2D (H, W) or 3D (H, W, C) / (C, H, W) image array, "
            f"got {array.ndim}D with shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where}: empty image (height={array.shape[0]}, width={array.shape[1]})")
    array = np.ascontiguousarray(_to_uint8(array, where))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return PIL.Image.fromarray(array, mode="L").convert("RGB")
    if array.shape[-1] == 4:
        return _composite_on_white(PIL.Image.fromarray(array, mode="RGBA"))
    return PIL.Image.fromarray(array, mode="RGB")


def to_rgb_pil(image: Any, where: str = "image", input_data_format: str | None = None) -> PIL.Image.Image:
    """Load/convert one image input to an RGB ``PIL.Image``.

    Accepts a ``PIL.Image`` (any mode), a numpy array (HW, HWC or CHW; uint8, integer, bool or float),
    a torch tensor (CHW or HWC), a file path (str / ``os.PathLike``), an http(s) URL, a base64
    ``data:`` URI, or encoded image bytes. ``where`` names the input in error messages.
    """
    channels_first = None
    if input_data_format is not None:
        fmt = str(getattr(input_data_format, "value", input_data_format))
        if fmt not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}")
        channels_first = fmt == "channels_first"

    if isinstance(image, PIL.Image.Image):
        try:
            image.load()
        except Exception as err:
            source = f" from {image.filename!r}" if getattr(image, "filename", None) else ""
            raise ValueError(
                f"{where}: could not load PIL image data{source}: {type(err).__name__}: {err}"
            ) from err
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where}: empty image (width={image.width}, height={image.height})")
        return pil_to_rgb(image, where)
    if isinstance(image, (str, os.PathLike)):
        return to_rgb_pil(_load_image_source(image, where), where)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return to_rgb_pil(_open_image_bytes(bytes(image), where, "bytes"), where)
    if torch is not None and isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if channels_first is None and tensor.ndim == 3:
            # torch default is channels-first; fall back to channels-last when only that fits.
            channels_first = tensor.shape[0] in (1, 3, 4) or tensor.shape[-1] not in (1, 3, 4)
        return _array_to_pil(tensor.numpy(), where, channels_first)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, where, channels_first)
    raise TypeError(
        f"{where}: unsupported image type {type(image).__name__}; expected a PIL.Image, numpy array, "
        "torch tensor, file path, URL, data URI or bytes"
    )


def _is_image_leaf(obj: Any) -> bool:
    return not isinstance(obj, (list, tuple))


def flatten_images(images: Any, name: str = "images") -> list[tuple[Any, str]]:
    """Flatten an image, a list of images or nested lists into ``[(image, label), ...]`` in order."""
    if _is_image_leaf(images):
        return [(images, name)]
    flat = []
    for index, item in enumerate(images):
        label = f"{name}[{index}]"
        if item is None:
            raise ValueError(f"{label} is None; expected an image")
        flat.extend(flatten_images(item, label))
    return flat


# --------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------


def _size_dict(size: Any) -> dict[str, int]:
    if size is None:
        return {"height": 224, "width": 224}
    if isinstance(size, int) and size > 0:
        return {"height": int(size), "width": int(size)}
    if isinstance(size, (list, tuple)) and len(size) == 2 and min(size) > 0:
        return {"height": int(size[0]), "width": int(size[1])}
    if hasattr(size, "keys") and "height" in size and "width" in size:
        height, width = size["height"], size["width"]
        if height is not None and width is not None and int(height) > 0 and int(width) > 0:
            return {"height": int(height), "width": int(width)}
    raise ValueError(f"size must be an int, (height, width) or a dict with 'height' and 'width', got {size!r}")


def _channel_values(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {value!r}")
    return values


class NanoVisionImageProcessor(BaseImageProcessor):
    r"""Fixed-resolution image processor (SigLIP style), implemented with PIL + numpy only.

    Steps: convert to RGB (alpha composited on white, any PIL mode, numpy/torch arrays, files), resize
    to ``size`` with PIL bicubic, rescale by ``rescale_factor`` (1/255) and normalize with
    ``image_mean`` / ``image_std`` (0.5 by default, i.e. pixels end up in [-1, 1]).

    Args:
        do_resize (`bool`, defaults to `True`): resize to ``size``.
        size (`dict`, defaults to `{"height": 224, "width": 224}`): output size (an int or
            (height, width) is accepted too).
        resample (`int`, defaults to `PIL.Image.BICUBIC`): PIL resampling filter.
        do_rescale (`bool`, defaults to `True`), rescale_factor (`float`, defaults to `1/255`).
        do_normalize (`bool`, defaults to `True`), image_mean / image_std (defaults to 0.5 each).
        do_convert_rgb (`bool`, defaults to `True`): always effectively on; kept for API compatibility.

    Call with one image, a list of images or nested lists (one list per sample); every image is
    processed and ``pixel_values`` holds all of them in order, shape ``[N, 3, H, W]``.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.size = _size_dict(size)
        self.resample = int(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = list(_channel_values(0.5 if image_mean is None else image_mean, "image_mean"))
        self.image_std = list(_channel_values(0.5 if image_std is None else image_std, "image_std"))
        self.do_convert_rgb = bool(do_convert_rgb)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def fetch_images(self, image_url_or_urls):
        # Loading is done lazily in `preprocess` (with clear errors), never by the base class.
        return image_url_or_urls

    def resize_image(self, image: PIL.Image.Image, size: dict[str, int], resample: int) -> PIL.Image.Image:
        target = (size["width"], size["height"])
        if image.size == target:
            return image
        return image.resize(target, resample=PIL.Image.Resampling(resample))

    def preprocess(
        self,
        images,
        do_resize: bool | None = None,
        size: dict[str, int] | None = None,
        resample: int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: str | None = None,
        data_format: str | None = "channels_first",
        input_data_format: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Process ``images`` into ``BatchFeature({"pixel_values": [N, 3, H, W] float32})``.

        Extra keyword arguments accepted by transformers' `ImagesKwargs` (``device``,
        ``do_center_crop``...) are ignored. ``return_tensors`` is ``None`` (numpy), ``"np"`` or ``"pt"``.
        """
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else _size_dict(size)
        resample = self.resample if resample is None else int(resample)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else float(rescale_factor)
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        mean = np.asarray(_channel_values(self.image_mean if image_mean is None else image_mean, "image_mean"))
        std = np.asarray(_channel_values(self.image_std if image_std is None else image_std, "image_std"))
        data_format = str(getattr(data_format, "value", data_format or "channels_first"))
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        if images is None:
            raise ValueError("images must not be None")

        flat = flatten_images(images)
        if not flat:
            raise ValueError("no images were given (empty list)")

        arrays = []
        for image, label in flat:
            pil = to_rgb_pil(image, label, input_data_format=input_data_format)
            if do_resize:
                pil = self.resize_image(pil, size, resample)
            array = np.asarray(pil, dtype=np.float32)
            if do_rescale:
                array = array * np.float32(rescale_factor)
            if do_normalize:
                array = (array - mean.astype(np.float32)) / std.astype(np.float32)
            if data_format == "channels_first":
                array = array.transpose(2, 0, 1)
            arrays.append(np.ascontiguousarray(array, dtype=np.float32))

        shapes = {a.shape for a in arrays}
        pixel_values = np.stack(arrays) if len(shapes) == 1 else arrays
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("_valid_processor_keys", "_valid_kwargs_names"):
            output.pop(key, None)
        return output


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


class NanoVisionProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {
        "text_kwargs": {
            "padding": False,
            "return_mm_token_type_ids": False,
            "return_text_replacement_offsets": False,
        },
        "images_kwargs": {},
    }


def _to_python_list(values: Any) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class NanoVisionProcessor(ProcessorMixin):
    r"""Processor combining :class:`NanoVisionImageProcessor` and the nanovision tokenizer.

    Args:
        image_processor: a `NanoVisionImageProcessor`.
        tokenizer: the nanovision tokenizer (must know ``<image>``, ``<|image_start|>``,
            ``<|image_end|>``).
        num_image_tokens (`int`, defaults to 64): how many LM positions each image occupies (taken from
            the model config). Each ``<image>`` placeholder becomes ``<|image_start|>`` +
            ``<image>`` * num_image_tokens + ``<|image_end|>``.
        chat_template (`str`, *optional*): defaults to the tokenizer's chat template.

    ``__call__(images=None, text=None, **kwargs)`` returns ``input_ids``, ``attention_mask`` and, when
    images are given, ``pixel_values`` (all images of the batch concatenated, in order). Optional
    outputs (text kwargs): ``return_mm_token_type_ids`` (1 on image, image-start and image-end
    tokens), ``return_text_replacement_offsets`` (one entry per expanded placeholder, as
    `ProcessorMixin.get_text_with_replacements` reports them), ``return_offsets_mapping`` (character
    offsets in the *expanded* text when ``return_text_replacement_offsets`` is also set, which is how
    transformers >= 5.19 and vLLM use it; otherwise in the text that was passed, with the tokens of an
    expansion spanning their ``<image>`` placeholder).
    """

    valid_processor_kwargs = NanoVisionProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 64,
        chat_template: str | None = None,
        **kwargs,
    ):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        num_image_tokens = int(num_image_tokens)
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.num_image_tokens = num_image_tokens
        self.image_token = self._tokenizer_attr(tokenizer, "image_token", DEFAULT_IMAGE_TOKEN)
        self.image_start_token = self._tokenizer_attr(tokenizer, "image_start_token", DEFAULT_IMAGE_START_TOKEN)
        self.image_end_token = self._tokenizer_attr(tokenizer, "image_end_token", DEFAULT_IMAGE_END_TOKEN)
        if tokenizer is not None:
            self.image_token_id = self._single_token_id(tokenizer, self.image_token)
            self.image_start_token_id = self._single_token_id(tokenizer, self.image_start_token)
            self.image_end_token_id = self._single_token_id(tokenizer, self.image_end_token)
        else:
            self.image_token_id = self.image_start_token_id = self.image_end_token_id = None
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors for `from_pretrained`.

        The image processor is always this module's `NanoVisionImageProcessor`, loaded directly
        rather than through `AutoImageProcessor`, so a saved folder loads whether or not the classes
        were registered with the Auto classes (and, as remote code, without nanovision installed).
        It also avoids transformers 5.16/5.17, whose top-level `AutoImageProcessor` is a placeholder
        that raises when torchvision is not installed.
        """
        from transformers import AutoTokenizer

        kwargs = dict(kwargs)
        subfolder = kwargs.pop("subfolder", "")
        kwargs.pop("num_image_tokens", None)  # a processor setting, applied by `from_args_and_dict`
        image_kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in ("trust_remote_code", "use_fast", "backend", "code_revision", "_from_auto")
        }
        image_processor = NanoVisionImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **image_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _tokenizer_attr(tokenizer, name: str, default: str) -> str:
        try:
            value = getattr(tokenizer, name, None) if tokenizer is not None else None
        except Exception:
            value = None
        return str(value) if value else default

    @staticmethod
    def _single_token_id(tokenizer, token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"The tokenizer must encode {token!r} as a single special token, got ids {ids}. "
                "Use the nanovision tokenizer (nanovision.tokenizer.train_tokenizer)."
            )
        return int(ids[0])

    @property
    def image_token_ids(self) -> list[int]:
        """Token ids that belong to an image: the placeholder and its start/end markers.

        These are the ids marked 1 in ``mm_token_type_ids`` and counted by
        `_get_num_multimodal_tokens`.
        """
        return [self.image_token_id, self.image_start_token_id, self.image_end_token_id]

    @image_token_ids.setter
    def image_token_ids(self, value):
        raise AttributeError("image_token_ids is derived from the tokenizer's image tokens and cannot be set")

    @property
    def image_replacement(self) -> str:
        """The string each ``<image>`` placeholder is expanded to."""
        return self.image_start_token + self.image_token * self.num_image_tokens + self.image_end_token

    def replace_image_token(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs) -> str:
        """Expansion of one placeholder (same for every image). Mirrors ProcessorMixin's hook."""
        return self.image_replacement

    @property
    def num_tokens_per_image(self) -> int:
        """LM positions one image takes in ``input_ids``, markers included (num_image_tokens + 2)."""
        return self.num_image_tokens + 2

    def _expand_text(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        replacement = self.image_replacement
        pieces, offsets = [], []
        last = shift = 0
        for match in re.finditer(re.escape(self.image_token), text):
            start, end = match.span()
            pieces.append(text[last:start])
            new_start = start + shift
            offsets.append(
                {
                    "type": "image",
                    "span": (start, end),
                    "new_span": (new_start, new_start + len(replacement)),
                    "text": match.group(),
                    "replacement": replacement,
                }
            )
            pieces.append(replacement)
            shift += len(replacement) - (end - start)
            last = end
        pieces.append(text[last:])
        return "".join(pieces), offsets

    @staticmethod
    def _offsets_in_original_text(row: list, replacements: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """Map token character offsets from the expanded text back to the text before expansion."""
        mapped = []
        for start, end in row:
            start, end = int(start), int(end)
            if start == end:  # padding / zero-width tokens
                mapped.append((start, end))
                continue
            shift = 0
            target = None
            for entry in replacements:
                new_start, new_end = entry["new_span"]
                if start >= new_end:
                    shift = new_end - entry["span"][1]
                elif start >= new_start:
                    target = tuple(entry["span"])
                    break
                else:
                    break
            mapped.append(target if target is not None else (start - shift, end - shift))
        return mapped

    def _images_per_sample(self, images: Any, texts: list[str], counts: list[int]) -> list[list[Any]]:
        """Split ``images`` into one list per text, validating against the placeholder counts."""
        batch = len(texts)
        if images is None:
            per_sample = [[] for _ in texts]
        elif _is_image_leaf(images):
            if batch != 1:
                raise ValueError(
                    f"A single image was given for a batch of {batch} texts; pass a list with one list "
                    "of images per text"
                )
            per_sample = [[images]]
        elif any(isinstance(item, (list, tuple)) for item in images):
            # nested: one entry (list of images, or a single image) per text
            if len(images) != batch:
                raise ValueError(
                    f"Got {len(images)} lists of images for {batch} text(s); pass one list of images per text"
                )
            per_sample = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        else:
            flat = list(images)
            if batch == 1:
                per_sample = [flat]
            else:
                total = sum(counts)
                if len(flat) != total:
                    raise ValueError(
                        f"The {batch} texts contain {total} '{self.image_token}' placeholder(s) in total "
                        f"(per text: {counts}) but {len(flat)} image(s) were given"
                    )
                per_sample, start = [], 0
                for count in counts:
                    per_sample.append(flat[start : start + count])
                    start += count
        for index, (count, sample_images) in enumerate(zip(counts, per_sample)):
            if count != len(sample_images):
                where = f"Sample {index}" if batch > 1 else "The text"
                raise ValueError(
                    f"{where} contains {count} '{self.image_token}' placeholder(s) but {len(sample_images)} "
                    f"image(s) were given for it (sample {index} of a batch of {batch}); "
                    "the number of images must equal the number of placeholders"
                )
        return per_sample

    # -- main entry point -----------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenize ``text`` (expanding ``<image>`` placeholders) and preprocess ``images``.

        Args:
            images: ``None``; one image; a flat list (one per placeholder, in order; for a batch they
                are distributed over the texts by their placeholder counts); or a list of lists, one
                per text. Any input type accepted by `NanoVisionImageProcessor`.
            text: a string or a list of strings.
            **kwargs: tokenizer kwargs (``padding``, ``padding_side``, ``truncation``,
                ``max_length``, ``return_offsets_mapping``...), image processor kwargs,
                ``return_tensors`` ("pt"/"np"), ``return_mm_token_type_ids``,
                ``return_text_replacement_offsets``.
        """
        if videos is not None or audio is not None:
            raise ValueError(f"{type(self).__name__} only supports images and text (got videos/audio)")
        if images is None and text is None:
            raise ValueError(f"You need to provide `text` and/or `images` to {type(self).__name__}")

        output_kwargs = self._merge_kwargs(
            NanoVisionProcessorKwargs,
            tokenizer_init_kwargs=self.tokenizer.init_kwargs,
            **kwargs,
        )
        text_kwargs = dict(output_kwargs["text_kwargs"])
        images_kwargs = dict(output_kwargs["images_kwargs"])
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = bool(text_kwargs.pop("return_mm_token_type_ids", False))
        return_replacement_offsets = bool(text_kwargs.pop("return_text_replacement_offsets", False))

        data: dict[str, Any] = {}
        image_inputs: Any = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, sample in enumerate(texts):
                if not isinstance(sample, str):
                    raise TypeError(f"text[{index}] must be a str, got {type(sample).__name__}")
            counts = [sample.count(self.image_token) for sample in texts]
            per_sample = self._images_per_sample(images, texts, counts)
            if any(per_sample):
                # errors then name the input as images[i] (one text) or images[sample][i] (a batch)
                image_inputs = per_sample[0] if len(per_sample) == 1 else per_sample

            expanded, replacement_offsets = [], []
            for sample in texts:
                new_text, offsets = self._expand_text(sample)
                expanded.append(new_text)
                replacement_offsets.append(offsets)

            encoding = self.tokenizer(expanded, **text_kwargs)
            text_data = {key: _to_python_list(value) for key, value in encoding.items()}
            if "offset_mapping" in text_data and not return_replacement_offsets:
                # Without the replacement offsets the caller cannot relate the expanded text to its
                # own, so report offsets in the text it passed (tokens of an expansion get the span
                # of their placeholder). transformers < 5.19's `apply_chat_template` relies on this.
                text_data["offset_mapping"] = [
                    self._offsets_in_original_text(row, offsets)
                    for row, offsets in zip(text_data["offset_mapping"], replacement_offsets)
                ]
            self._check_image_token_counts(text_data["input_ids"], counts)
            data.update(text_data)
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(text_data["input_ids"])
            if return_replacement_offsets:
                data["text_replacement_offsets"] = replacement_offsets
        elif images is not None:
            image_inputs = images

        if image_inputs is not None:
            image_outputs = self.image_processor(image_inputs, **images_kwargs)
            data["pixel_values"] = image_outputs["pixel_values"]

        return self._make_batch_feature(data, return_tensors)

    @staticmethod
    def _make_batch_feature(data: dict[str, Any], return_tensors) -> BatchFeature:
        skip = ["text_replacement_offsets"]
        try:
            return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip)
        except TypeError:  # older BatchFeature without skip_tensor_conversion
            offsets = data.pop("text_replacement_offsets", None)
            feature = BatchFeature(data=data, tensor_type=return_tensors)
            if offsets is not None:
                feature["text_replacement_offsets"] = offsets
            return feature

    def _check_image_token_counts(self, input_ids: list[list[int]], counts: list[int]) -> None:
        expected = [count * self.num_image_tokens for count in counts]
        found = [list(row).count(self.image_token_id) for row in input_ids]
        if found != expected:
            raise ValueError(
                f"Image token count mismatch after tokenization: expected {expected} '{self.image_token}' "
                f"ids per sample ({self.num_image_tokens} per image) but found {found}. This usually means "
                "truncation cut into an image; disable truncation or increase max_length."
            )

    def create_mm_token_type_ids(self, input_ids) -> list[list[int]]:
        """1 where the token belongs to an image (placeholder, start or end marker), else 0."""
        image_ids = set(self.image_token_ids)
        return [[1 if int(token) in image_ids else 0 for token in row] for row in _to_python_list(input_ids)]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Number of LM positions each image of the given sizes takes (used by vLLM).

        Every image is resized to a fixed size, so the count does not depend on ``image_sizes``. The
        count **includes** the ``<|image_start|>`` / ``<|image_end|>`` markers
        (``num_image_tokens + 2``), like InternVL and Chameleon in transformers: it equals the number
        of positions marked 1 in ``mm_token_type_ids`` (see `image_token_ids`) and the length of the
        replacement each placeholder expands to, of which only the ``<image>`` positions carry
        embeddings.
        """
        vision_data = {}
        if image_sizes is not None:
            vision_data["num_image_tokens"] = [self.num_tokens_per_image] * len(image_sizes)
            vision_data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**vision_data)

    # -- decoding ----------------------------------------------------------------------------------

    def batch_decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids (a single sequence or a batch) into a list of strings."""
        sequences = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        if not sequences or not isinstance(sequences[0], (list, tuple)) and not hasattr(sequences[0], "tolist"):
            sequences = [sequences]  # a single sequence
        sequences = [row.tolist() if hasattr(row, "tolist") else list(row) for row in sequences]
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))


__all__ = ["NanoVisionImageProcessor", "NanoVisionProcessor"]
