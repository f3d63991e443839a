"""Thumbnails and full images for one shard, made and written by a pool of threads.

Pillow releases the GIL while it decodes, resizes and encodes, so threads scale; the
number of images in flight is bounded, so memory stays flat however large a shard is.
A row's files are named by its shard and its position there (`thumbs/part-00003/
000017.webp`): ids may hold any character, positions are safe in every file system.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

THUMB_SIDE = 256  # long side, in pixels; smaller images are kept at their own size
THUMB_QUALITY = 80
# What the detail view shows, and so what the site stores beside the thumbnails: a copy of
# each image's own bytes (the site then holds the output's images a second time), a WebP
# of it at its own size (a fraction of a PNG's bytes, near-lossless to the eye), or
# nothing (the detail view enlarges the thumbnail; the image stays in the output).
FULL_IMAGES = ("copy", "webp", "none")
FULL_WEBP_QUALITY = 90
# What Pillow calls a format -> the extension the full image is written with.
FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


def thumb_path(shard: str, row: int) -> str:
    return f"thumbs/{shard}/{row:06d}.webp"


def image_path(shard: str, row: int, ext: str) -> str:
    return f"images/{shard}/{row:06d}.{ext}"


def _webp(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=quality, method=4)
    return buffer.getvalue()


def _decoded(data: bytes, draft: bool) -> tuple[Image.Image, str]:
    """An encoded image decoded to RGB(A), and the extension of its format."""
    with Image.open(io.BytesIO(data)) as image:
        ext = FORMAT_EXTENSIONS.get(image.format or "")
        if ext is None:
            raise ValueError(f"unsupported image format {image.format!r}")
        if draft:
            image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG decodes at a reduced scale
        return image.convert("RGBA" if "A" in image.getbands() else "RGB"), ext


def make_thumbnail(data: bytes) -> tuple[bytes, str]:
    """(WebP thumbnail, extension of the original's format) of an encoded image."""
    thumb, ext = _decoded(data, draft=True)
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
    return _webp(thumb, THUMB_QUALITY), ext


def full_image(data: bytes, ext: str, mode: str) -> tuple[bytes, str] | None:
    """What the detail view shows for an image of format `ext` (see FULL_IMAGES): its
    bytes and extension, or None."""
    if mode == "none":
        return None
    if mode == "copy" or ext == "webp":
        return data, ext
    return _webp(_decoded(data, draft=False)[0], FULL_WEBP_QUALITY), "webp"


@dataclass
class RowImages:
    """What the page needs to know of a row's files: the extension of the image the
    detail view shows (with `full_images: none`, the original's), or why there is no
    image (an image that does not decode is shown as such, not dropped)."""

    ext: str | None
    error: str | None = None


class ThumbnailPool:
    """Writes each row's thumbnail and full image (`full`: one of FULL_IMAGES) through
    `write(relative path, bytes)`."""

    def __init__(self, write: Callable[[str, bytes], None], workers: int, full: str = "copy"):
        self.write = write
        self.full = full
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="thumb")

    def _one(self, shard: str, row: int, data: bytes) -> RowImages:
        try:
            thumb, ext = make_thumbnail(data)
            full = full_image(data, ext, self.full)
        except Exception as error:  # a bad image is the row's news, not the run's end
            return RowImages(None, f"image does not decode: {type(error).__name__}: {error}")
        self.write(thumb_path(shard, row), thumb)
        if full is not None:
            data, ext = full
            self.write(image_path(shard, row, ext), data)
        return RowImages(ext)

    def shard(self, shard: str, rows: Iterable[dict[str, Any]],
              keep: Callable[[dict[str, Any]], None]) -> list[RowImages]:
        """Submit every row's image (popped from the row, which then goes to `keep`);
        returns each row's files in row order once all are written."""
        done: list[RowImages] = []
        in_flight: deque[Future] = deque()
        for row_number, row in enumerate(rows):
            data = row.pop("image", None)
            keep(row)
            if not isinstance(data, (bytes, bytearray)):
                in_flight.append(_resolved(RowImages(None, "no image bytes in this row")))
            else:
                in_flight.append(self.pool.submit(self._one, shard, row_number, bytes(data)))
            while len(in_flight) > 4 * self.workers:  # bounded: memory stays flat
                done.append(in_flight.popleft().result())
        done.extend(future.result() for future in in_flight)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _resolved(value: RowImages) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
