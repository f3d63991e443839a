"""Small helpers the job-system tests share."""

from __future__ import annotations

from collections.abc import Callable

from ldm_jobs.jobs.spec import parse_spec


def make_spec(input_path, output_path, **sections):
    """A spec on a tiny, fast sampling setup; each keyword updates one spec section."""
    data = {"input": {"path": str(input_path)}, "output": {"path": str(output_path)},
            "sampling": {"width": 16, "height": 16, "steps": 2}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return parse_spec(data)


def write_yaml(folder, data, name="job.yaml") -> str:
    """`data` saved as a YAML job spec in `folder`; returns its path."""
    import yaml

    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


A1111_SAMPLING = {"width": 16, "height": 16, "steps": 4, "sampler": "euler_ancestral", "guidance_scale": 6.0}


def a1111_job(folder, columns: dict, negative: str) -> tuple[dict, dict, Callable]:
    """An in-process job under prompt_syntax a1111 on builtin:tiny-random over an input of
    ``columns`` (an ``id`` and a ``prompt`` column at least), every row in one shard.
    Checks that each image is, within 1/255, the one ``generate`` draws for its row's
    prompt and seed; returns (id -> output record, id -> rejection reason, ``drawn(prompt,
    seed)``: that image as ints)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ldm_jobs.jobs.runner import run_job
    from ldm_jobs.model.pipeline import load_pipeline

    pq.write_table(pa.table(columns), folder / "in.parquet")
    spec = parse_spec({
        "name": "a1111", "model": "builtin:tiny-random", "input": {"path": str(folder / "in.parquet")},
        "output": {"path": str(folder / "out"), "rows_per_shard": len(columns["id"])},
        "sampling": {**A1111_SAMPLING, "negative_prompt": negative, "prompt_syntax": "a1111"},
        "compute": {"actors": 1, "batch_size": 3}})
    run_job(spec, progress=False, in_process=True)
    out = {r["id"]: r for r in pq.read_table(folder / "out" / "part-00000.parquet").to_pylist()}
    errors = {r["id"]: r["reason"] for r in pq.read_table(folder / "out" / "errors.parquet").to_pylist()}
    pipe = load_pipeline("builtin:tiny-random")
    prompts = dict(zip(columns["id"], columns["prompt"]))

    def drawn(prompt, seed):
        image = pipe.generate([prompt], seeds=[seed], negative_prompts=[negative],
                              prompt_syntax="a1111", **A1111_SAMPLING)[0]
        return np.asarray(image).astype(int)

    for image_id, row in out.items():
        got = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
        assert np.abs(got - drawn(prompts[image_id], row["seed"])).max() <= 1, image_id
    return out, errors, drawn
