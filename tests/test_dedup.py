"""The on-disk repeated-id check (jobs/dedup.py) finds what the in-memory one finds.

Oracle: `plan.find_duplicates`, the tested in-memory check, on inputs with repeats
across files and row groups, null and empty ids, and with images_per_prompt 3 the
`B-j` ids that clash with `B`; run with a few tiny partitions so every partition holds
several keys and some hold none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs import dedup
from ldm_jobs.jobs.plan import find_duplicates, make_plan
from ldm_jobs.jobs.readers import describe_file
from ldm_jobs.jobs.spec import parse_spec
from ldm_jobs.jobs.storage import open_storage


def _inputs(folder: Path, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir()
    paths = []
    for index in range(3):
        rows = 700
        ids = [f"r{rng.integers(0, 900)}" for _ in range(rows)]
        for position in rng.choice(rows, 40, replace=False):  # ids that clash with B-j
            ids[position] = f"r{rng.integers(0, 900)}-{rng.integers(1, 5)}"
        ids[5] = None
        ids[6] = ""
        path = folder / f"part-{index}.parquet"
        pq.write_table(pa.table({"id": ids, "prompt": ["p"] * rows}), path, row_group_size=128)
        paths.append(path)
    return paths


@pytest.mark.parametrize("images_per_prompt", [1, 3])
@pytest.mark.parametrize("partitions", [1, 7])
def test_on_disk_equals_in_memory(tmp_path: Path, images_per_prompt: int, partitions: int):
    paths = _inputs(tmp_path / "in", seed=images_per_prompt)
    storage = open_storage(str(paths[0]))
    files = [describe_file(storage, str(path), "prompt") for path in paths]
    expected = find_duplicates(storage, files, "id", "prompt", images_per_prompt)
    found = dedup.find_duplicates_on_disk(storage, files, "id", images_per_prompt, partitions,
                                          folder=str(tmp_path))
    assert len(expected) > 100  # repeats and B-j clashes are really there
    assert found == expected


def test_id_hash_depends_on_the_text_alone() -> None:
    ids = pa.array(["a", "bb", "", "a", "ab", "ba", None, "x" * 200]).filter(
        pa.array([True, True, True, True, True, True, False, True]))
    sliced = pa.array(["zz", "a", "bb"]).slice(1)
    hashes = dedup.id_hash(ids)
    assert hashes[0] == hashes[3]
    assert len(set(hashes.tolist())) == 6  # different texts, different values here
    assert dedup.id_hash(sliced).tolist() == hashes[:2].tolist()


def test_plans_are_the_same_either_way(tmp_path: Path, monkeypatch) -> None:
    _inputs(tmp_path / "in", seed=5)
    spec = parse_spec({"input": {"path": str(tmp_path / "in")},
                       "output": {"path": str(tmp_path / "out"), "rows_per_shard": 300},
                       "sampling": {"images_per_prompt": 2}})
    in_memory = make_plan(spec)
    monkeypatch.setattr(dedup, "IN_MEMORY_ROWS", 0)
    monkeypatch.setattr(dedup, "PARTITION_ROWS", 500)
    on_disk = make_plan(spec)
    assert [s.duplicates for s in on_disk.shards] == [s.duplicates for s in in_memory.shards]
    assert sum(len(s.duplicates) for s in on_disk.shards) > 100


def test_shard_fingerprints_keep_their_definition(tmp_path: Path) -> None:
    """Fingerprints are serialised once per plan now; they must equal the definition (a
    sha256 of the decisive fields as sorted JSON), or resumes of older outputs break."""
    import hashlib
    import json

    _inputs(tmp_path / "in", seed=9)
    spec = parse_spec({"input": {"path": str(tmp_path / "in")},
                       "output": {"path": str(tmp_path / "out"), "rows_per_shard": 300}})
    plan = make_plan(spec)
    assert len(plan.shards) > 3
    for shard in plan.shards:
        decisive = {
            "model": spec.model,
            "input": {"prompt_column": "prompt", "id_column": "id"},
            "output": spec.output.model_dump(exclude={"path"}),
            "sampling": spec.sampling.model_dump(),
            "slices": [[s.path, s.first, s.count, s.offset] for s in shard.slices],
        }
        expected = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
        assert shard.fingerprint == expected
