"""The gallery's folder (local or s3://) and one run of `show --html` from start to end.

Layout of the site, all relative so it opens from disk or from a bucket alike:
```
index.html              the page, with the summary (counts, facets, groups) inline
assets/gallery.{css,js} the page's code: no library, font or CDN
data/group-NNNNN.js     a page group's rows, loaded when shown or searched
data/errors.js          the rejected rows, grouped by reason
thumbs/<shard>/<row>.webp, images/<shard>/<row>.<ext> (the detail view's image: see FULL_IMAGES)
cache/                  per-shard metadata and what was written: makes re-runs incremental
```
A shard is thumbnailed once: `cache/_index.json` names each shard done with its sha256,
written after the shard's files, so a run killed half-way redoes only that shard.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from html import escape
from importlib import resources
from typing import Any

from ..report import Output, open_output
from ..spec import StorageSpec, redact_text
from ..storage import LocalStorage, NotFoundError, StorageError, open_storage, split_s3
from .index import PAGE_SIZE, GroupBuilder, ShardCache, dumps
from .plots import duration_plot, outcome_plot, throughput_plot
from .source import base_name, jsonable, rejected_rows, shard_name, shard_records, shard_rows
from .thumbs import FULL_IMAGES, ThumbnailPool

ASSETS = ("gallery.css", "gallery.js")
INDEX = "cache/_index.json"
MAX_REASONS = 500  # distinct reasons listed; the rest are counted together
S3_WORKERS = 16  # threads making and uploading thumbnails when the site is on S3
ROWS_PER_REASON = 200  # rejected rows listed under one reason; the rest are counted


class GalleryError(Exception):
    """The gallery cannot be written; the message names the location."""


@dataclass
class GalleryResult:
    dest: str
    rows: int  # images in the gallery
    shards: int
    new_shards: int  # shards thumbnailed by this run (the others were done before)
    rejected: int
    groups: int
    note: str = ""  # a word about where the site was put, when it matters

    def describe(self) -> str:
        text = (f"gallery    {self.dest}/index.html: {self.rows} images in {self.shards} "
                f"shard(s) ({self.new_shards} new this run), {self.rejected} rejected rows")
        return text + (f"\nnote       {self.note}" if self.note else "")


class Destination:
    """Files under the gallery's folder or prefix, by relative path."""

    def __init__(self, uri: str, storage_spec: StorageSpec | None):
        self.uri = uri.rstrip("/") if "://" in uri else uri
        self.storage = open_storage(uri, storage_spec)
        self.local = isinstance(self.storage, LocalStorage)
        self._folders: set[str] = set()

    def path(self, relative: str) -> str:
        return self.storage.join(self.uri, *relative.split("/"))

    def write(self, relative: str, data: bytes) -> None:
        if not self.local:
            self.storage.write_atomic(self.path(relative), data)
            return
        # Locally: rename into place, but no fsync per thumbnail (100,000 of them): a run
        # that dies re-makes its unfinished shard, and cache/_index.json goes last.
        target = self.path(relative).removeprefix("file://")
        folder = os.path.dirname(target)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        temp = f"{target}.tmp-{os.getpid()}"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, target)

    def delete_below(self, relative: str) -> None:
        """Remove every file under the folder or prefix `relative`."""
        for path in self.storage.list(self.path(relative)):
            self.storage.delete(path)

    def read(self, relative: str) -> bytes | None:
        try:
            return self.storage.read_bytes(self.path(relative))
        except NotFoundError:
            return None
        except Exception:
            if self.local and not os.path.exists(self.path(relative).removeprefix("file://")):
                return None
            raise


def output_link(output_uri: str, dest_uri: str) -> str:
    """The output folder as the page links to it: relative where both sit in one file
    system or bucket (the site moves with its data), else the output's own address."""
    out_remote, dest_remote = "://" in output_uri, "://" in dest_uri
    if not out_remote and not dest_remote:
        return os.path.relpath(os.path.abspath(output_uri),
                               os.path.abspath(dest_uri)).replace(os.sep, "/")
    if output_uri.startswith("s3://") and dest_uri.startswith("s3://"):
        (out_bucket, out_key), (dest_bucket, dest_key) = split_s3(output_uri), split_s3(dest_uri)
        if out_bucket == dest_bucket:
            return posixpath.relpath("/" + out_key.strip("/"), "/" + dest_key.strip("/"))
    return redact_text(output_uri)


def placement_note(output_uri: str, dest_uri: str) -> str:
    """A warning when the site sits inside the output under a name that readers of the
    whole folder (pyarrow.dataset, which skips only `_` and `.` names) would read as data."""
    def norm(uri: str) -> str:
        return (uri if "://" in uri and not uri.startswith("file://")
                else os.path.abspath(uri.removeprefix("file://")).replace(os.sep, "/"))

    output, dest = norm(output_uri).rstrip("/"), norm(dest_uri).rstrip("/")
    if not dest.startswith(output + "/"):
        return ""
    first = dest[len(output) + 1:].split("/")[0]
    if first.startswith(("_", ".")):
        return ""
    return (f"the site is inside the output under '{first}': readers of the whole output "
            "folder (pyarrow.dataset, ray.data) would take its files for data; name it with "
            f"a leading '_' (e.g. {redact_text(output_uri.rstrip('/'))}/_gallery) or put it "
            "beside the output")


def _index_state(dest: Destination) -> dict[str, Any]:
    data = dest.read(INDEX)
    try:
        state = json.loads(data) if data else {}
    except ValueError:
        state = {}  # unreadable: everything is made again, nothing is trusted
    return {"shards": dict(state.get("shards", {})), "files": dict(state.get("files", {}))}


def _shard_key(out: Output, path: str, record: dict[str, Any] | None, full_images: str) -> str:
    """What a shard's site files were made from: its content, and what was kept of its
    images (a site made with another `full_images` is redone)."""
    key = str(record["sha256"]) if record and record.get("sha256") else str(out.storage.version(path))
    return key if full_images == "copy" else f"{key}+{full_images}"


def _thumbnail_new_shards(out: Output, dest: Destination, records: dict[str, dict],
                          state: dict[str, Any], workers: int, full_images: str) -> int:
    """Thumbnails, full images and a metadata cache for each shard not done before."""
    new = 0
    pool = ThumbnailPool(dest.write, workers, full_images)
    try:
        for path in out.shard_files:
            name = shard_name(path)
            key = _shard_key(out, path, records.get(name), full_images)
            if state["shards"].get(name) == key:
                continue
            if name in state["shards"]:  # made before from other bytes or in another mode
                dest.delete_below(f"images/{name}")
                dest.delete_below(f"thumbs/{name}")
            cache = ShardCache(name, base_name(path), key)
            try:
                images = pool.shard(name, shard_rows(out, path),
                                    lambda row, cache=cache: cache.add(
                                        {column: jsonable(v) for column, v in row.items()}))
            except (StorageError, OSError):
                raise
            except Exception as error:  # a shard that does not read: name it
                raise GalleryError(f"{redact_text(path)}: cannot read this shard "
                                   f"({type(error).__name__}: {error})") from None
            cache.ext = [image.ext for image in images]
            cache.image_error = [image.error for image in images]
            dest.write(f"cache/{name}.json", cache.to_json())
            state["shards"][name] = key
            new += 1
    finally:
        pool.close()
    return new


def _write_if_changed(dest: Destination, state: dict[str, Any], relative: str,
                      data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if state["files"].get(relative) != digest:
        dest.write(relative, data)
        state["files"][relative] = digest


def _script(callback: str, content: Any) -> bytes:
    """A data file for `<script src>`: JSON handed to a function the page defines."""
    return f"{callback}({dumps(content, sort_keys=False)});\n".encode()


def _build_groups(out: Output, dest: Destination,
                  state: dict[str, Any]) -> tuple[GroupBuilder, list[dict[str, Any]]]:
    """Group files from the shard caches, a shard at a time; returns the facets too."""
    def emit(number: int, content: dict[str, Any]) -> None:
        _write_if_changed(dest, state, f"data/group-{number:05d}.js",
                          _script("GALLERY_GROUP", content))

    builder = GroupBuilder(emit)
    for path in out.shard_files:
        data = dest.read(f"cache/{shard_name(path)}.json")
        if data is None:
            raise GalleryError(f"{dest.uri}: cache/{shard_name(path)}.json is missing; "
                               "delete cache/_index.json to rebuild the gallery")
        builder.add(ShardCache.from_json(data))
    return builder, builder.finish()


def _errors(out: Output, records: dict[str, dict], prompt_column: str) -> dict[str, Any]:
    """Rejected rows grouped by reason, most frequent first, lists capped."""
    reasons: dict[str, dict[str, Any]] = {}
    other, total = 0, 0
    for row in rejected_rows(out, records, prompt_column):
        total += 1
        reason = str(row.get("reason") or "(no reason recorded)")
        entry = reasons.get(reason)
        if entry is None:
            if len(reasons) >= MAX_REASONS:
                other += 1
                continue
            entry = reasons[reason] = {"reason": reason, "count": 0, "rows": []}
        entry["count"] += 1
        if len(entry["rows"]) < ROWS_PER_REASON:
            entry["rows"].append({key: jsonable(row.get(key))
                                  for key in ("id", "row", "shard", "prompt")})
    ordered = sorted(reasons.values(), key=lambda entry: (-entry["count"], entry["reason"]))
    return {"total": total, "reasons": ordered, "other_reasons_rows": other,
            "rows_per_reason": ROWS_PER_REASON}


def _plots_html(records: dict[str, dict], generated: int, rejected: int,
                pending: int | None) -> str:
    ordered = [records[name] for name in sorted(records)]
    parts = []
    for plot in (throughput_plot(ordered), duration_plot(ordered),
                 outcome_plot(generated, rejected, pending)):
        note = f"<p class=\"note\">{escape(plot.note)}</p>" if plot.note else ""
        parts.append(f"<figure class=\"chart\"><figcaption>{plot.title}</figcaption>"
                     f"{plot.svg}{note}</figure>")
    return "\n".join(parts)


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def write_gallery(output_uri: str, dest_uri: str, storage_spec: StorageSpec | None = None,
                  workers: int | None = None, full_images: str = "copy") -> GalleryResult:
    """Write (or bring up to date) the static gallery of the output at `output_uri`.
    `full_images`: what the detail view shows (thumbs.FULL_IMAGES: copy, webp, none)."""
    if full_images not in FULL_IMAGES:
        raise GalleryError(f"full_images={full_images!r}: expected one of {', '.join(FULL_IMAGES)}")
    out = open_output(output_uri, storage_spec)
    dest = Destination(dest_uri, storage_spec)
    # Local thumbnails are CPU work: a thread a core. On S3 each thread mostly waits on
    # its PUTs, so more of them keep the cores busy.
    workers = workers or (min(8, os.cpu_count() or 2) if dest.local else S3_WORKERS)
    records = shard_records(out)
    state = _index_state(dest)
    new = _thumbnail_new_shards(out, dest, records, state, workers, full_images)
    builder, facets = _build_groups(out, dest, state)

    manifest = out.manifest or {}
    spec_input = (manifest.get("spec") or {}).get("input") or {}
    errors = _errors(out, records, spec_input.get("prompt_column") or "prompt")
    _write_if_changed(dest, state, "data/errors.js", _script("GALLERY_ERRORS", errors))

    rejected = sum(int(r.get("rejected", 0)) for r in records.values())
    pending = None
    if manifest.get("counts"):
        done = sum(int(r.get("accepted_rows", 0)) for r in records.values()) + rejected
        pending = max(0, int(manifest["counts"]["input_rows"]) - done)
    title = manifest.get("name") or output_uri.rstrip("/").rsplit("/", 1)[-1]
    summary = {
        "title": title, "output": redact_text(out.uri), "complete": out.complete,
        "model": (manifest.get("model") or {}).get("name"),
        "link": output_link(output_uri, dest_uri),
        "shard_files": {shard_name(path): base_name(path) for path in out.shard_files},
        "rows": builder.total, "rejected": rejected, "pending": pending,
        "page_size": PAGE_SIZE, "group_rows": builder.group_rows,
        "groups": builder.group_sizes, "columns": builder.columns,
        "facets": facets, "reasons": len(errors["reasons"]), "full_images": full_images,
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    fills = {"TITLE": escape(title),
             "PLOTS": _plots_html(records, builder.total, rejected, pending),
             # JSON inside <script>: no "</script>" may appear in it, so no "<" at all.
             "SUMMARY": dumps(summary, sort_keys=False).replace("<", "\\u003c")}
    page = re.sub(r"__(TITLE|PLOTS|SUMMARY)__", lambda match: fills[match.group(1)],
                  _asset("index.html").decode())
    dest.write("index.html", page.encode())
    for name in ASSETS:
        dest.write(f"assets/{name}", _asset(name))
    dest.write(INDEX, json.dumps(state, sort_keys=True).encode())
    return GalleryResult(redact_text(dest.uri), builder.total, len(out.shard_files), new,
                         rejected, len(builder.group_sizes),
                         placement_note(output_uri, dest_uri))

