"""`GenerateImages` in a real Ray Data pipeline gives what `ldm-jobs run` gives.

read_parquet -> map_batches(GenerateImages, actor pool of 2) -> write_parquet on the
session's local Ray, against `run_job` on the same rows: same columns, same values, and
the same image bytes per id. Tiny random model, 16x16, 2 steps.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs.ray_data import GenerateImages
from ldm_jobs.jobs.runner import run_job
from ldm_jobs.jobs.spec import parse_spec

SAMPLING = {"width": 16, "height": 16, "steps": 2, "seed": 3, "sampler": "euler"}


def _input(path: Path) -> Path:
    table = pa.table({
        "id": ["a", "b", "c", "d", "e", "f"],
        "prompt": ["a red circle", "a blue square", "two dots", "a stripe", "a star", "rain"],
        "seed": pa.array([None, 7, None, None, 11, None], pa.int64()),
        "guidance_scale": pa.array([None, None, 1.0, None, None, 3.0], pa.float64()),
        "tag": ["t0", "t1", "t2", "t3", "t4", "t5"],
    })
    path.mkdir()
    for part in range(3):  # three blocks, so both actors of the pool get work
        pq.write_table(table.slice(2 * part, 2), path / f"part-{part}.parquet")
    return path


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


@pytest.mark.usefixtures("ray_cluster")
def test_map_batches_matches_ldm_jobs_run(tmp_path: Path) -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    source = _input(tmp_path / "prompts")
    written = tmp_path / "ray_data_out"
    dataset = ray.data.read_parquet(str(source), override_num_blocks=3).map_batches(
        GenerateImages, batch_size=2, concurrency=2, num_cpus=0.5, batch_format="pyarrow",
        fn_constructor_kwargs={"model": "builtin:tiny-random", "sampling": SAMPLING,
                               "dtype": "float32", "batch_size": 2})
    dataset.write_parquet(str(written))
    through_ray_data = pq.read_table(written)

    spec = parse_spec({"model": "builtin:tiny-random", "input": {"path": str(source)},
                       "output": {"path": str(tmp_path / "run_out")}, "sampling": SAMPLING,
                       "compute": {"batch_size": 3}})
    run_job(spec, progress=False)
    through_run = pq.read_table(tmp_path / "run_out")

    assert through_ray_data.column_names == through_run.column_names
    assert through_ray_data.schema == through_run.schema
    ours, theirs = _by_id(through_ray_data), _by_id(through_run)
    assert sorted(ours) == sorted(theirs) == ["a", "b", "c", "d", "e", "f"]
    for image_id, row in theirs.items():
        assert ours[image_id] == row, image_id  # every column, the image bytes included
    # Distinct rows gave distinct images (the comparison above is not of constants).
    assert len({row["image"] for row in theirs.values()}) == 6


def test_a_row_run_would_reject_raises_naming_it(fake_pipeline) -> None:
    generate = GenerateImages(sampling=SAMPLING, pipeline=fake_pipeline, device="cpu")
    batch = pa.table({"id": ["ok", "bad"], "prompt": ["fine", None]})
    with pytest.raises(ValueError, match=r"1 row\(s\).*bad: prompt: null"):
        generate(batch)
    good = generate({"id": ["x", "y"], "prompt": ["one", "two"]})
    assert good.column("id").to_pylist() == ["x", "y"]
    assert good.column("image").null_count == 0


def test_rows_without_ids_are_refused(fake_pipeline) -> None:
    generate = GenerateImages(sampling=SAMPLING, pipeline=fake_pipeline, device="cpu")
    with pytest.raises(ValueError, match="no id column 'id'"):
        generate(pa.table({"prompt": ["one"]}))
