"""`show --grid`: the X/Y plot of a sweep, each cell the image of its two values."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.dataset as pads
from PIL import Image
from test_expand import inputs, run_in_process, run_shards  # noqa: F401 (a fixture)

from ldm_jobs.jobs.cli import main
from ldm_jobs.jobs.grid import LABEL, MIN_CELL
from ldm_jobs.jobs.spec import parse_spec


def test_grid_cells_are_the_swept_images(inputs, fake_pipeline, capsys):  # noqa: F811
    spec = parse_spec({"input": {"path": str(inputs / "in.parquet")},
                       "output": {"path": str(inputs / "out"), "rows_per_shard": 5},
                       "sampling": {"width": 16, "height": 16, "steps": 2},
                       "expand": {"sweep": {"guidance_scale": [3, 5, 7], "sampler": ["euler", "ddim"]}}})
    run_in_process(spec, fake_pipeline)
    png = inputs / "grid.png"
    code = main(["show", str(inputs / "out"), "--grid", "x=guidance_scale,y=sampler",
                 "--out", str(png), "--where", "template=plain text"])
    assert code == 0
    assert "3 x 2 cells" in capsys.readouterr().out
    grid = np.asarray(Image.open(png).convert("RGB"))
    table = pads.dataset(str(inputs / "out"), format="parquet").to_table().to_pylist()
    rows = [r for r in table if r["template"] == "plain text"]
    cell = MIN_CELL  # 16-pixel images enlarged 8x
    top = 2 * LABEL + 4
    left = grid.shape[1] - 3 * cell
    assert grid.shape[0] == top + 2 * cell
    for i, g in enumerate([3.0, 5.0, 7.0]):
        for j, sampler in enumerate(["euler", "ddim"]):
            (row,) = [r for r in rows if r["guidance_scale"] == g and r["sampler"] == sampler]
            image = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((cell, cell), Image.NEAREST)
            got = grid[top + j * cell : top + (j + 1) * cell, left + i * cell : left + (i + 1) * cell]
            assert np.array_equal(got, np.asarray(image)), (g, sampler)
    # labels were drawn: the margins are not blank
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()


def test_grid_errors_exit_2(inputs, fake_pipeline, capsys):  # noqa: F811
    spec = parse_spec({"input": {"path": str(inputs / "in.parquet")},
                       "output": {"path": str(inputs / "out2"), "rows_per_shard": 5},
                       "sampling": {"width": 16, "height": 16, "steps": 2},
                       "expand": {"sweep": {"steps": [1, 2]}}})
    run_in_process(spec, fake_pipeline)
    out = str(inputs / "out2")
    for args in (["--grid", "x=steps,y=colour", "--out", "g.png"], ["--grid", "x=steps"],
                 ["--grid", "x=steps,y=sampler"],
                 ["--grid", "x=steps,y=sampler", "--out", "g.png", "--where", "template=none"]):
        assert main(["show", out, *args]) == 2, args
        assert "error" in capsys.readouterr().err.lower()


def test_grid_from_and_to_s3(inputs, s3_server, fake_pipeline):  # noqa: F811
    import boto3

    bucket = s3_server.make_bucket()
    spec = parse_spec({"input": {"path": str(inputs / "in.parquet")},
                       "output": {"path": f"s3://{bucket}/run", "rows_per_shard": 7},
                       "sampling": {"width": 16, "height": 16, "steps": 2},
                       "expand": {"sweep": {"steps": [1, 2], "guidance_scale": [2, 4]}}})
    run_shards(spec, fake_pipeline)
    assert main(["show", f"s3://{bucket}/run", "--grid", "x=steps,y=guidance_scale",
                 "--out", f"s3://{bucket}/grid.png", "--where", "template=plain text"]) == 0
    body = boto3.client("s3", endpoint_url=s3_server.endpoint_url).get_object(
        Bucket=bucket, Key="grid.png")["Body"].read()
    grid = Image.open(io.BytesIO(body))
    assert grid.height == 2 * LABEL + 4 + 2 * MIN_CELL and grid.width > 2 * MIN_CELL


def test_large_images_are_shrunk_to_the_largest_cell():
    from ldm_jobs.jobs.grid import MAX_CELL, draw_grid

    cells = {(x, y): Image.new("RGB", (1024, 768), (40 * x, 40 * y, 0)) for x in range(3) for y in range(2)}
    grid = draw_grid(cells, [0, 1, 2], [0, 1], "steps", "seed")
    assert grid.height == 2 * LABEL + 4 + 2 * (MAX_CELL * 3 // 4)
    pixel = grid.getpixel((grid.width - 10, grid.height - 10))
    assert pixel == (80, 40, 0)  # the last cell holds image (2, 1)
