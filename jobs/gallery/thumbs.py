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
# What Pillow calls a format -> the extension the full image is written with.
FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


def thumb_path(shard: str, row: int) -> str:
    return f"thumbs/{shard}/{row:06d}.webp"


def image_path(shard: str, row: int, ext: str) -> str:
    return f"images/{shard}/{row:06d}.{ext}"


def make_thumbnail(data: bytes) -> tuple[bytes, str]:
    """(WebP thumbnail, extension of the original's format) of an encoded image."""
    with Image.open(io.BytesIO(data)) as image:
        ext = FORMAT_EXTENSIONS.get(image.format or "")
        if ext is None:
            raise ValueError(f"unsupported image format {image.format!r}")
        image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG decodes at a reduced scale
        thumb = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, "WEBP", quality=THUMB_QUALITY, method=4)
    return buffer.getvalue(), ext


@dataclass
class RowImages:
    """What the page needs to know of a row's files: the full image's extension, or why
    there is no image (an image that does not decode is shown as such, not dropped)."""

    ext: str | None
    error: str | None = None


class ThumbnailPool:
    """Writes each row's thumbnail and full image through `write(relative path, bytes)`."""

    def __init__(self, write: Callable[[str, bytes], None], workers: int):
        self.write = write
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="thumb")

    def _one(self, shard: str, row: int, data: bytes) -> RowImages:
        try:
            thumb, ext = make_thumbnail(data)
        except Exception as error:  # a bad image is the row's news, not the run's end
            return RowImages(None, f"image does not decode: {type(error).__name__}: {error}")
        self.write(thumb_path(shard, row), thumb)
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
