"""Image encoding with the generation parameters embedded, as AUTOMATIC1111 writes them.

PNG carries a `parameters` tEXt chunk; JPEG and WebP carry the same text in the EXIF
UserComment (and JPEG also in a COM segment). Encoder settings are fixed so the same
image always gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

from .rows import ImageTask

# Our sampler names -> the names A1111 writes, so its tools parse our images.
A1111_SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
USER_COMMENT = 0x9286


def parameters_text(task: ImageTask, model_name: str, model_hash: str) -> str:
    """The A1111 "parameters" text: prompt, negative prompt line, then key: value pairs."""
    lines = [task.prompt]
    if task.negative_prompt:
        lines.append(f"Negative prompt: {task.negative_prompt}")
    pairs = [
        ("Steps", task.steps),
        ("Sampler", A1111_SAMPLERS.get(task.sampler, task.sampler)),
        ("CFG scale", task.guidance_scale),
        ("Seed", task.seed),
        ("Size", f"{task.width}x{task.height}"),
        ("Model hash", model_hash.removeprefix("sha256:")[:10]),
        ("Model", model_name),
    ]
    if task.strength is not None:
        pairs.append(("Denoising strength", task.strength))
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs))
    return "\n".join(lines)


def _png(image: Image.Image, text: str, quality: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info, compress_level=6, optimize=False)
    return buffer.getvalue()


def _exif(text: str) -> bytes:
    exif = Image.Exif()
    # EXIF UserComment: an 8-byte charset tag, then the text (A1111 uses UNICODE, UTF-16).
    exif.get_ifd(ExifTags.IFD.Exif)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def _jpeg(image: Image.Image, text: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=_exif(text), comment=text.encode("utf-8"),
               optimize=False, progressive=False)
    return buffer.getvalue()


def _webp(image: Image.Image, text: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=quality, method=4, exif=_exif(text))
    return buffer.getvalue()


ENCODERS: dict[str, Callable[[Image.Image, str, int], bytes]] = {
    "png": _png,
    "jpeg": _jpeg,
    "webp": _webp,
}


def encode(image: Image.Image, image_format: str, text: str, quality: int = 95) -> bytes:
    """Encode one generated image with its parameters text embedded."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return ENCODERS[image_format](image, text, quality)


def read_parameters(data: bytes) -> str | None:
    """The embedded parameters text of an encoded image, or None."""
    with Image.open(io.BytesIO(data)) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    return None
