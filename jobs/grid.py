"""`ldm-jobs show OUT --grid x=FIELD,y=FIELD --out FILE.png`: the web UI's X/Y plot.

One image per cell: the images whose FIELD values are the column's and the row's, with
the axis values written along the top and the left, in the sweep's order. ``--where field=value`` (repeatable)
picks the rows first, e.g. one template of a sweep. Where several images share a cell
(another field varies too) the first by id is drawn and the summary says how many cells
were shared, so nothing is hidden silently. Cells are 128 to 512 pixels, so a grid of
tiny test images stays readable and one of large images stays a sane size; local or
``s3://`` outputs, local or ``s3://`` PNGs.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from .report import open_output
from .spec import StorageSpec
from .storage import open_storage

MIN_CELL = 128
MAX_CELL = 512  # a 10 x 10 sweep of 1024-pixel images stays a 5k-pixel PNG
LABEL = 14  # pixels per line of label text


class GridError(ValueError):
    """A grid that cannot be drawn: bad axes, unknown fields, no rows left."""


def parse_axes(text: str) -> tuple[str, str]:
    """``x=FIELD,y=FIELD`` -> (x field, y field)."""
    axes = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    if set(axes) != {"x", "y"} or not all(axes.values()):
        raise GridError(f"--grid {text!r}: expected x=FIELD,y=FIELD")
    return axes["x"], axes["y"]


def _ordered(values: set, swept: list | None) -> list:
    """The sweep's own order where the job swept the field (as the web UI lays out its
    axes), else sorted."""
    if swept:
        position = {str(v): i for i, v in enumerate(swept)}
        return sorted(values, key=lambda v: (position.get(str(v), len(position)), str(v)))
    try:
        return sorted(values)
    except TypeError:  # mixed types: sort by their text
        return sorted(values, key=str)


def draw_grid(cells: dict[tuple[Any, Any], Image.Image], xs: list, ys: list,
              x_name: str, y_name: str) -> Image.Image:
    """The labelled grid: x values across the top, y values down the left."""
    first = next(iter(cells.values()))
    side = max(first.size)
    scale = max(1, -(-MIN_CELL // side)) if side < MIN_CELL else min(1.0, MAX_CELL / side)
    cw, ch = round(first.width * scale), round(first.height * scale)
    left = max(len(f"{y_name}={y}") for y in ys) * 6 + 8
    top = 2 * LABEL + 4
    sheet = Image.new("RGB", (left + cw * len(xs), top + ch * len(ys)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((4, 2), f"x: {x_name}   y: {y_name}", fill="black", font=font)
    for i, x in enumerate(xs):
        draw.text((left + i * cw + 4, LABEL + 2), f"{x_name}={x}", fill="black", font=font)
    for j, y in enumerate(ys):
        draw.text((4, top + j * ch + ch // 2 - LABEL // 2), f"{y_name}={y}", fill="black", font=font)
        for i, x in enumerate(xs):
            image = cells.get((x, y))
            if image is not None:
                # whole-pixel enlargement stays crisp; shrinking is filtered
                image = image.convert("RGB").resize(
                    (cw, ch), Image.NEAREST if scale >= 1 else Image.LANCZOS)
                sheet.paste(image, (left + i * cw, top + j * ch))
    return sheet


def grid(uri: str, axes: str, out: str, where: list[str] | None = None,
         storage_spec: StorageSpec | None = None) -> str:
    """Write the X/Y grid of an output to ``out``; returns a line saying what was drawn."""
    x_name, y_name = parse_axes(axes)
    output = open_output(uri, storage_spec)
    dataset = output.dataset
    sweep = (((output.manifest or {}).get("spec") or {}).get("expand") or {}).get("sweep") or {}
    names = dataset.schema.names
    conditions = [item.split("=", 1) for item in where or []]
    for field in [x_name, y_name, *(c[0] for c in conditions)]:
        if field not in names:
            raise GridError(f"no field {field!r} in {uri} (fields: {', '.join(names)})")
    if any(len(c) != 2 for c in conditions):
        raise GridError("--where takes FIELD=VALUE")
    wanted = [x_name, y_name, "id", *(c[0] for c in conditions)]
    table = dataset.to_table(columns=list(dict.fromkeys(wanted)))
    keep = [i for i, row in enumerate(table.to_pylist())
            if all(str(row[f]) == v for f, v in conditions)]
    if not keep:
        raise GridError(f"no image of {uri} matches {' and '.join(where or [])}")
    rows = table.take(keep).to_pylist()
    order = sorted(range(len(rows)), key=lambda i: str(rows[i]["id"]))
    chosen: dict[tuple, str] = {}
    for i in order:
        chosen.setdefault((rows[i][x_name], rows[i][y_name]), rows[i]["id"])
    xs = _ordered({k[0] for k in chosen}, sweep.get(x_name))
    ys = _ordered({k[1] for k in chosen}, sweep.get(y_name))
    images = dataset.to_table(columns=["id", "image"],
                              filter=ds.field("id").isin(list(chosen.values()))).to_pylist()
    by_id = {r["id"]: Image.open(io.BytesIO(r["image"])) for r in images}
    cells = {key: by_id[image_id] for key, image_id in chosen.items()}
    buffer = io.BytesIO()
    draw_grid(cells, xs, ys, x_name, y_name).save(buffer, "PNG")
    open_storage(out, storage_spec).write_atomic(out, buffer.getvalue())
    shared = len(rows) - len(chosen)
    return (f"grid       {out} ({len(xs)} x {len(ys)} cells: {x_name} x {y_name}"
            + (f"; {shared} other image(s) shared a cell, narrow with --where" if shared else "")
            + ")")
