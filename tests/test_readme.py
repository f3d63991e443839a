"""The README and docs/ stay true: their code blocks run, their commands succeed.

Each document is worked through in order, in a scratch folder holding a copy of
`examples/` and a `.venv/bin` that points at this interpreter's, the way a user reads it:
- a ```python block runs as a script (`python block.py`, one process per block);
- a ```bash block runs in `bash -eo pipefail`, `ldm-jobs` and `python` being this venv's;
- `<!-- file: NAME -->` before a block writes the block to NAME (an input, a spec);
- `<!-- output -->` before a block compares it with what the block before it printed
  (`...` stands for any text, such as an absolute path);
- `<!-- not run: WHY -->` before a block skips it. Every skip is declared in SKIPPED
  below and counted; any other block that looks like code runs, and an unlabelled
  ```yaml block must at least parse.

Commands are made cheap only through the substitutions declared in SUBSTITUTIONS (each
must still match its document). Documents whose commands start Ray are marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/api.md", "docs/job-spec.md", "docs/output.md", "docs/cli.md"]
STARTS_RAY = {"README.md", "docs/output.md", "docs/cli.md"}  # they `ldm-jobs run` a job

# (document, reason) of every block that is not run; a new skip must be added here.
SKIPPED = {
    ("README.md", "builds a fresh .venv and runs the whole suite; the tests run the demo "
                  "job's commands below instead"),
    ("README.md", "needs Stable Diffusion 1.5 weights and a GPU"),
    ("README.md", "needs an AWS account and a GPU cluster"),
    ("README.md", "needs Docker and a Kubernetes cluster with KubeRay and GPU nodes"),
    ("README.md", "a pipeline of its own; tests/test_ray_data.py runs this against ldm-jobs run"),
    ("docs/cli.md", "needs a Ray cluster with its dashboard reachable"),
}
# document -> {text in a runnable block: what runs instead}, to keep the cost down.
SUBSTITUTIONS = {
    "README.md": {
        # the demo at 2 steps on one actor instead of 20 steps on two
        "run examples/demo.yaml --set sampling.steps=20":
            "run examples/demo.yaml --set sampling.steps=2 --set compute.actors=1",
        # the output the README's own `run` just wrote, instead of a bucket
        '"s3://my-bucket/runs/s3-prompts"': '"out/demo"',
        "show s3://my-bucket/runs/demo --html s3://my-bucket/runs/demo_gallery":
            "show out/demo --html out/demo_gallery_again",
    },
}
CODE = {"python", "bash", "sh", "shell"}

BLOCK = re.compile(r"^(?:<!--\s*(?P<marker>.*?)\s*-->\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    document: str
    line: int
    lang: str
    body: str
    marker: str

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def read_blocks(document: str) -> list[Block]:
    text = (ROOT / document).read_text()
    return [Block(document, text.count("\n", 0, m.start("body")) + 1, m["lang"], m["body"],
                  m["marker"] or "") for m in BLOCK.finditer(text)]


def skip_reason(block: Block) -> str | None:
    return block.marker.removeprefix("not run:").strip() if block.marker.startswith(
        "not run:") else None


def matches(expected: str, actual: str) -> bool:
    """Line by line, trailing blanks ignored; `...` in `expected` stands for any text."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip("\n").splitlines()]

    pattern = "\n".join(".*".join(re.escape(part) for part in line.split("..."))
                        for line in lines(expected))
    return re.fullmatch(pattern, "\n".join(lines(actual))) is not None


# ---- what the documents say, checked without running anything --------------------------------

def test_every_block_is_run_or_declared_skipped():
    found = {(b.document, skip_reason(b)) for d in DOCUMENTS for b in read_blocks(d)
             if skip_reason(b) is not None}
    assert found == SKIPPED
    runnable = [b for d in DOCUMENTS for b in read_blocks(d)
                if b.lang in CODE and skip_reason(b) is None]
    assert len(runnable) >= 20, len(runnable)  # the checks below cover real code
    markers = {b.marker.split(":")[0] for d in DOCUMENTS for b in read_blocks(d)} - {""}
    assert markers <= {"not run", "file", "output"}, markers
    for document, substitutions in SUBSTITUTIONS.items():
        bodies = "".join(b.body for b in read_blocks(document) if skip_reason(b) is None)
        for old in substitutions:
            assert old in bodies, f"{document}: the substitution {old!r} no longer matches"


def test_readme_points_at_the_package_and_its_own_docs():
    readme = (ROOT / "README.md").read_text()
    assert "CONTRACT.md" not in readme and "../shared" not in readme
    assert "from ldm_jobs import load_pipeline" in readme
    assert "from ldm_jobs import open_output" in readme
    assert "python -m ldm_jobs" in readme
    assert "from ldm_jobs.model import" not in readme and "from ldm_jobs.jobs import" not in readme
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (ROOT / document).parent.joinpath(target).is_file(), (document, target)
    for document in DOCUMENTS[1:]:
        assert f"({document})" in readme, f"README does not link {document}"


def _fields(model, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    paths = []
    for name, info in model.model_fields.items():
        # a section, or an optional one (`expand: ExpandSpec | None`)
        kinds = [k for k in (info.annotation, *typing.get_args(info.annotation))
                 if isinstance(k, type) and issubclass(k, BaseModel)]
        if kinds:
            paths += _fields(kinds[0], f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def test_the_job_spec_page_names_every_field():
    from ldm_jobs.jobs.spec import JobSpec

    page = (ROOT / "docs" / "job-spec.md").read_text()
    fields = _fields(JobSpec)
    assert {"sampling.width", "input.path", "expand.prompts.mode"} <= set(fields)
    missing = [path for path in fields if f"| `{path}` |" not in page]
    assert not missing, f"docs/job-spec.md has no row for {missing}"


def test_the_cli_page_names_every_command_and_option():
    import argparse

    from ldm_jobs.jobs.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text()
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        assert f"## `{name}`" in page, name
        for action in parser._actions:
            for option in action.option_strings:
                if action.help != argparse.SUPPRESS and option not in ("-h", "--help"):
                    assert option in page, f"docs/cli.md does not mention {name} {option}"


# ---- running them ----------------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path) -> Path:
    work = tmp_path / "work"
    (work / "examples").mkdir(parents=True)
    for path in (ROOT / "examples").iterdir():
        if path.is_file():
            (work / "examples" / path.name).write_bytes(path.read_bytes())
    (work / ".venv").mkdir()
    (work / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    return work


def run_block(block: Block, work: Path, scripts: Path) -> str:
    body = block.body
    for old, new in SUBSTITUTIONS.get(block.document, {}).items():
        body = body.replace(old, new)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if block.lang == "python":
        script = scripts / f"{Path(block.document).stem}_{block.line}.py"
        script.write_text(body)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-eo", "pipefail", "-c", body]
    done = subprocess.run(command, cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, f"{block.where} failed ({done.returncode}):\n{body}\n" \
                                 f"{done.stdout[-4000:]}"
    return done.stdout


@pytest.mark.parametrize("document", [
    pytest.param(d, marks=pytest.mark.slow) if d in STARTS_RAY else d for d in DOCUMENTS])
def test_document_runs(document, workdir, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    last_output, ran, skipped = None, 0, []
    for block in read_blocks(document):
        reason = skip_reason(block)
        if reason is not None:
            skipped.append(reason)
        elif block.marker.startswith("file:"):
            target = workdir / block.marker.removeprefix("file:").strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body)
        elif block.marker == "output":
            assert last_output is not None, f"{block.where}: no block before it printed"
            assert matches(block.body, last_output), (
                f"{block.where}: the output differs\n--- documented\n{block.body}"
                f"--- printed\n{last_output}")
        elif block.lang in CODE:
            last_output = run_block(block, workdir, scripts)
            ran += 1
        elif block.lang == "yaml":
            assert yaml.safe_load(block.body) is not None, block.where
    expected_skips = sorted(reason for doc, reason in SKIPPED if doc == document)
    assert sorted(skipped) == expected_skips
    assert ran > 0
    print(f"{document}: {ran} block(s) run, {len(skipped)} declared not run")
