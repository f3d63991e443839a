"""Image encoding with the generation parameters embedded, as AUTOMATIC1111 writes them,
and safe decoding of untrusted init images.

PNG carries a `parameters` tEXt chunk; JPEG and WebP carry the same text in the EXIF
UserComment (and JPEG also in a COM segment). Encoder settings are fixed so the same
image always gives the same bytes. JPEG segments hold at most 64 KiB, so there the text
is shortened (prompts first, the settings line kept) rather than failing the shard.

Init images come from the input table, so they are treated as hostile: only common
formats are parsed, and the pixel count declared in the header is checked before any
pixel is decoded (a 100000x100000 PNG is a few hundred bytes and 30 GB once decoded).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import ExifTags, Image, UnidentifiedImageError
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


def parameters_text(task: ImageTask, model_name: str, model_hash: str,
                    loras: list[tuple[str, str, float]] = ()) -> str:
    """The A1111 "parameters" text: prompt, negative prompt line, then key: value pairs.
    ``loras``: (name, web UI hash, weight) of the image's LoRAs, for `Lora hashes:`."""
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
    if loras:  # quoted, as the web UI writes it: the value holds commas
        hashes = ", ".join(f"{name}: {digest[:12]}" for name, digest, _ in loras)
        pairs.append(("Lora hashes", f'"{hashes}"'))
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


# A JPEG segment holds 65533 bytes of payload; leave room for the EXIF/TIFF framing.
JPEG_TEXT_BYTES = 65_000


def fit_text(text: str, max_bytes: int, encoding: str) -> str:
    """`text` cut to encode in `max_bytes`, keeping its last line (the settings) whole."""
    if len(text.encode(encoding)) <= max_bytes:
        return text
    head, sep, settings = text.rpartition("\n")
    budget = max(0, max_bytes - len((" ...\n" + settings).encode(encoding)))
    # errors="ignore" drops a character (or surrogate pair) cut in half at the end.
    head = head.encode(encoding)[:budget].decode(encoding, errors="ignore")
    return f"{head} ...{sep}{settings}" if sep else head


def _jpeg(image: Image.Image, text: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    exif_text = fit_text(text, JPEG_TEXT_BYTES, "utf-16-be")
    comment = fit_text(text, JPEG_TEXT_BYTES, "utf-8").encode("utf-8")
    image.save(buffer, "JPEG", quality=quality, exif=_exif(exif_text), comment=comment,
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


# ---- init images (untrusted) ---------------------------------------------------------------

# Formats an init image may have. Others (EPS runs Ghostscript, and rarely used parsers
# are where decoder bugs live) are refused by name.
INIT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# The largest init image accepted: twice the largest output (4096 x 4096). Checked from the
# header, before decoding, whatever PIL.Image.MAX_IMAGE_PIXELS is set to elsewhere.
MAX_INIT_PIXELS = 2 * 4096 * 4096


class InitImageError(ValueError):
    """An init image that cannot be used; the message says why (never the bytes)."""


def _format_name(data: bytes) -> str | None:
    """The format PIL would identify `data` as, from its header alone, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:  # not an image at all, or a header even PIL cannot read
        return None


def decode_init_image(data: bytes) -> Image.Image:
    """Decode an untrusted init image to RGB, refusing odd formats and pixel bombs."""
    try:
        with warnings.catch_warnings():
            # A header past PIL's own bomb limit raises; our smaller limit applies below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INIT_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InitImageError("image too large: its header declares more pixels than allowed "
                             f"({MAX_INIT_PIXELS}); refused before decoding") from None
    except UnidentifiedImageError:
        name = _format_name(data)
        if name is not None:
            raise InitImageError(f"unsupported image format {name} (supported: "
                                 f"{', '.join(INIT_IMAGE_FORMATS)})") from None
        raise InitImageError(f"not a readable image ({len(data)} bytes; supported formats: "
                             f"{', '.join(INIT_IMAGE_FORMATS)})") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0 or width * height > MAX_INIT_PIXELS:
            raise InitImageError(f"image of {width}x{height} pixels is over the limit of "
                                 f"{MAX_INIT_PIXELS} pixels; refused before decoding")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise InitImageError(f"corrupt {image.format} image: {error}") from None
        try:
            return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise InitImageError(f"cannot use a {image.format} image of mode {image.mode}: "
                                 f"{error}") from None
