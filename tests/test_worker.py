import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import make_spec
from PIL import Image

from ldm_jobs.jobs.images import read_parameters
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.rows import MAX_PROMPT_CHARS, derive_seed
from ldm_jobs.jobs.worker import ShardWorker


def run_all(spec, pipeline):
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=pipeline)
    results = [worker.run(shard) for shard in plan.pending()]
    worker.close()
    return plan, results


def png_bytes(color=(200, 10, 10), size=(24, 24)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def read_errors(out):
    tables = [pq.read_table(p) for p in sorted((out / "_shards").glob("*.errors.parquet"))]
    return {row["id"]: row["reason"] for t in tables for row in t.to_pylist()}


def test_bad_rows_are_rejected_with_reasons(tmp_path, fake_pipeline):
    rows = [
        ("ok1", "a red cube", {}),
        ("nullp", None, {}),
        ("empty", "   ", {}),
        ("long", "x" * (MAX_PROMPT_CHARS + 1), {}),
        ("steps0", "p", {"steps": 0}),
        ("nan", "p", {"guidance_scale": float("nan")}),
        ("w7", "p", {"width": 7}),
        ("sampler", "p", {"sampler": "heun"}),
        ("strength", "p", {"strength": 1.5}),
        ("seed", "p", {"seed": -1}),
        ("badimg", "p", {"init_image": b"not an image"}),
        ("refused", "REFUSE this", {}),
        ("ok2", "a blue ball", {"guidance_scale": 3.0}),
    ]
    columns = {"id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}
    types = {"steps": pa.int64(), "guidance_scale": pa.float64(), "width": pa.int64(),
             "sampler": pa.string(), "strength": pa.float64(), "seed": pa.int64(),
             "init_image": pa.binary()}
    table = pa.table({**columns, **{name: pa.array([r[2].get(name) for r in rows], kind)
                                    for name, kind in types.items()}})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out")
    _, results = run_all(spec, fake_pipeline)
    assert results[0].generated == 2 and results[0].rejected == 11
    errors = read_errors(tmp_path / "out")
    assert set(errors) == {r[0] for r in rows} - {"ok1", "ok2"}
    expected = {
        "nullp": "prompt: null", "empty": "prompt: empty", "long": "prompt: 10001 characters",
        "steps0": "steps: must be between 1 and 1000", "nan": "guidance_scale: must be a finite",
        "w7": "width: must be a multiple of 8", "sampler": "sampler: unknown sampler 'heun'",
        "strength": "strength: must be in (0, 1]", "seed": "seed: must be between 0",
        "badimg": "init_image: not a readable image",
        "refused": "generation: prompts: refused by the fake pipeline",
    }
    for key, start in expected.items():
        assert errors[key].startswith(start), (key, errors[key])
    shard = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert shard.column("id").to_pylist() == ["ok1", "ok2"]
    assert shard.column("guidance_scale").to_pylist() == [7.5, 3.0]


def test_ids_seeds_and_columns(tmp_path, fake_pipeline):
    pq.write_table(pa.table({"prompt": ["a", "b"], "seed": [None, 41], "tag": ["t0", "t1"],
                             "model": ["mine", "mine"]}), tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     sampling={"images_per_prompt": 3, "seed": 7})
    run_all(spec, fake_pipeline)
    shard = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert shard.column_names == [
        "id", "prompt", "negative_prompt", "seed", "sampler", "steps", "guidance_scale",
        "width", "height", "strength", "model", "loras", "image", "image_format", "tag",
            "input_model"]
    ids = shard.column("id").to_pylist()
    assert ids == ["00000000", "00000000-1", "00000000-2", "00000001", "00000001-1",
                   "00000001-2"]
    seeds = shard.column("seed").to_pylist()
    assert seeds[:3] == [derive_seed(7, image_id) for image_id in ids[:3]]
    assert len(set(seeds[:3])) == 3
    assert seeds[3:] == [41, 42, 43]  # an explicit seed s gives s, s+1, ...
    assert shard.column("strength").to_pylist() == [None] * 6
    assert shard.column("model")[0].as_py() == "fake@sha256:" + "0123456789abcdef" * 4
    assert shard.column("tag").to_pylist() == ["t0"] * 3 + ["t1"] * 3
    assert shard.column("input_model").to_pylist() == ["mine"] * 6


def test_rerun_gives_identical_bytes_and_batches_share_shape(tmp_path, fake_pipeline):
    prompts = [f"prompt {i}" for i in range(7)]
    widths = [16, 32, 16, 32, 16, 16, None]
    pq.write_table(pa.table({"prompt": prompts, "width": pa.array(widths, pa.int64())}),
                   tmp_path / "in.parquet")
    first = make_spec(tmp_path / "in.parquet", tmp_path / "one", compute={"batch_size": 2})
    second = make_spec(tmp_path / "in.parquet", tmp_path / "two", compute={"batch_size": 5})
    _, results_one = run_all(first, fake_pipeline)
    for call in fake_pipeline.calls:
        assert len(call["prompts"]) <= 2
    assert [c["width"] for c in fake_pipeline.calls] == [16, 16, 16, 32]
    _, results_two = run_all(second, fake_pipeline)
    one = (tmp_path / "one" / "part-00000.parquet").read_bytes()
    assert one == (tmp_path / "two" / "part-00000.parquet").read_bytes()
    assert results_one[0].sha256 == results_two[0].sha256
    # Running the same shard again rewrites the very same bytes under the same name.
    run_all(first, fake_pipeline)  # planned as committed: nothing pending
    worker = ShardWorker(first, pipeline=fake_pipeline)
    worker.run(make_plan(first).shards[0])
    assert (tmp_path / "one" / "part-00000.parquet").read_bytes() == one


@pytest.mark.parametrize("image_format, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"),
                                                 ("webp", b"RIFF")])
def test_images_carry_parameters(tmp_path, fake_pipeline, image_format, magic):
    pq.write_table(pa.table({"prompt": ["a cat"], "negative_prompt": ["blurry"]}),
                   tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     output={"image_format": image_format})
    run_all(spec, fake_pipeline)
    row = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()[0]
    assert row["image"].startswith(magic) and row["image_format"] == image_format
    text = read_parameters(row["image"])
    assert text == (f"a cat\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7.5,"
                    f" Seed: {row['seed']}, Size: 16x16, Model hash: 0123456789, Model: fake")


def test_img2img_rows(tmp_path, fake_pipeline):
    (tmp_path / "init.png").write_bytes(png_bytes())
    table = pa.table({"prompt": ["from bytes", "from path", "plain"],
                      "init_image": pa.array([png_bytes((0, 0, 255)), None, None], pa.binary()),
                      })
    pq.write_table(table, tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"prompt": ["from path"], "init_image": ["init.png"]}),
                   tmp_path / "paths.parquet")
    spec = make_spec(tmp_path / "bytes.parquet", tmp_path / "out", sampling={"strength": 0.5})
    run_all(spec, fake_pipeline)
    img2img = [c for c in fake_pipeline.calls if c["init_images"]]
    assert len(img2img) == 1 and img2img[0]["strength"] == 0.5
    assert img2img[0]["init_images"][0].size == (16, 16)  # resized to the output size
    shard = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert shard.column("strength").to_pylist() == [0.5, None, None]
    spec = make_spec(tmp_path / "paths.parquet", tmp_path / "out2")
    _, results = run_all(spec, fake_pipeline)
    assert results[0].generated == 1 and results[0].rejected == 0


def test_webdataset_member_names_are_safe(tmp_path, fake_pipeline):
    ids = ["plain", "../../etc/passwd", "a/b", "nul\x00byte", "dots.in.id", "é", "z" * 500]
    pq.write_table(pa.table({"id": ids, "prompt": ["p"] * len(ids)}), tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out", output={"format": "webdataset"})
    run_all(spec, fake_pipeline)
    path = tmp_path / "out" / "part-00000.tar"
    with tarfile.open(path) as tar:
        names = tar.getnames()
        metadata = [json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")]
    assert len(names) == 2 * len(ids)
    for name in names:
        assert "/" not in name and "\x00" not in name and ".." not in name
        assert len(name) <= 100 and name.count(".") == 1
    assert names[:2] == ["plain.png", "plain.json"]
    assert [m["id"] for m in metadata] == ids
    assert len({n.split(".")[0] for n in names}) == len(ids)


def test_real_tiny_pipeline(tmp_path):
    model = pytest.importorskip("ldm_jobs.model")
    try:
        pipeline = model.load_pipeline("builtin:tiny-random")
    except Exception as error:  # the model package may still be in progress
        pytest.skip(f"builtin:tiny-random unavailable: {error}")
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red square", "a blue circle"]}),
                   tmp_path / "in.parquet")
    spec = make_spec(tmp_path / "in.parquet", tmp_path / "out",
                     sampling={"width": 32, "height": 32})
    spec = spec.model_copy(update={"model": "builtin:tiny-random"})
    _, results = run_all(spec, pipeline)
    assert results[0].generated == 2
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    image = Image.open(io.BytesIO(rows[0]["image"]))
    assert image.size == (32, 32)
    assert rows[0]["model"].startswith("builtin:tiny-random@sha256:")
    first = (tmp_path / "out" / "part-00000.parquet").read_bytes()
    worker = ShardWorker(spec, pipeline=pipeline)
    worker.run(make_plan(spec).shards[0])
    assert (tmp_path / "out" / "part-00000.parquet").read_bytes() == first


def test_csv_and_text_inputs(tmp_path, fake_pipeline):
    (tmp_path / "in.csv").write_text("id,prompt,steps,note\n10,first,3,x\n11,second,,y\n")
    spec = make_spec(tmp_path / "in.csv", tmp_path / "out")
    _, results = run_all(spec, fake_pipeline)
    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    assert [(r["id"], r["prompt"], r["steps"], r["note"]) for r in rows] == [
        ("10", "first", 3, "x"), ("11", "second", 2, "y")]
    (tmp_path / "in.txt").write_text("one prompt\n\nanother prompt\n")
    spec = make_spec(tmp_path / "in.txt", tmp_path / "out2")
    run_all(spec, fake_pipeline)
    rows = pq.read_table(tmp_path / "out2" / "part-00000.parquet").to_pylist()
    assert [(r["id"], r["prompt"]) for r in rows] == [("00000000", "one prompt"),
                                                      ("00000001", "another prompt")]
