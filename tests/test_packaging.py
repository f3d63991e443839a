"""The distribution behaves like a package: one top-level `ldm_jobs`, its data inside it,
a quiet build, and no clash with a user's own `model.py` or `jobs/`.

The wheel is built the way pip builds it (offline, with the venv's setuptools), from a
copy of the source tree, so no stale `build/` folder of the checkout can leak into it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a clone has that a build must not read: environments, outputs, caches, old builds.
NOT_SOURCE = shutil.ignore_patterns(".venv", "venv", ".git", "build", "dist", "out", "tmp",
                                    "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")
# setuptools' warnings about a project's configuration (a TOML-table license, data folders
# "absent from packages", deprecated keys) are Python warnings (SetuptoolsDeprecationWarning,
# shown by pip as BuildBackendWarning) framed by `!!` banners. distutils' lower-case
# "warning: build_py: byte-compiling is disabled" notes are no such thing.
SETUPTOOLS_WARNING = re.compile(r"\b[A-Z]\w*Warning\b|^\s*!!\s*$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """(the built wheel, the build's output)."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source") / "ldm-jobs"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (built,) = out.glob("ldm_jobs-*.whl")
    return built, build.stdout + build.stderr


def test_the_wheel_holds_one_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel[0]).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"ldm_jobs"}
    assert "model" not in tops and "jobs" not in tops
    expected = [
        "ldm_jobs/__init__.py", "ldm_jobs/__main__.py",
        "ldm_jobs/model/__init__.py", "ldm_jobs/model/pipeline.py", "ldm_jobs/model/unet.py",
        "ldm_jobs/jobs/__init__.py", "ldm_jobs/jobs/cli.py", "ldm_jobs/jobs/spec.py",
        "ldm_jobs/model/data/clip/vocab.json", "ldm_jobs/model/data/clip/merges.txt",
        "ldm_jobs/model/builtin/shapes/model_index.json",
        "ldm_jobs/model/builtin/shapes/scheduler/scheduler_config.json",
    ]
    for component in ("unet", "vae", "text_encoder"):
        expected.append(f"ldm_jobs/model/builtin/shapes/{component}/config.json")
    expected += ["ldm_jobs/model/builtin/shapes/unet/diffusion_pytorch_model.safetensors",
                 "ldm_jobs/model/builtin/shapes/vae/diffusion_pytorch_model.safetensors",
                 "ldm_jobs/model/builtin/shapes/text_encoder/model.safetensors"]
    missing = [name for name in expected if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    # every file the built-in model folder ships is in the wheel, byte for byte
    shipped = sorted(p for p in (ROOT / "model" / "builtin" / "shapes").rglob("*") if p.is_file()
                     and "__pycache__" not in p.parts)
    with zipfile.ZipFile(wheel[0]) as archive:
        for path in shipped:
            name = "ldm_jobs/model/" + path.relative_to(ROOT / "model").as_posix()
            assert archive.read(name) == path.read_bytes(), name
    metadata = zipfile.ZipFile(wheel[0]).read("ldm_jobs-0.1.0.dist-info/METADATA").decode()
    assert re.search(r"^License-Expression: MIT$", metadata, re.MULTILINE)
    entry_points = zipfile.ZipFile(wheel[0]).read(
        "ldm_jobs-0.1.0.dist-info/entry_points.txt").decode()
    assert "ldm-jobs = ldm_jobs.jobs.cli:main" in entry_points


def test_the_build_prints_no_setuptools_warnings(wheel):
    noisy = [line for line in wheel[1].splitlines() if SETUPTOOLS_WARNING.search(line)]
    assert not noisy, "\n".join(noisy[:20])


def test_a_users_own_model_and_jobs_do_not_clash(wheel, tmp_path):
    """Installed from the wheel, in a folder holding a `model.py` and a `jobs/` package of
    the user's own, both imports work side by side and each gets its own code."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel[0]) as archive:  # a pure wheel installs by unpacking it
        archive.extractall(site)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == [
        "ldm_jobs"]
    scratch = tmp_path / "project"
    (scratch / "jobs").mkdir(parents=True)
    (scratch / "model.py").write_text("WHO = 'the user model.py'\n")
    (scratch / "jobs" / "__init__.py").write_text("WHO = 'the user jobs package'\n")
    script = textwrap.dedent(f"""
        import model, jobs
        from ldm_jobs import load_pipeline, open_output
        import ldm_jobs, ldm_jobs.model, ldm_jobs.jobs
        assert model.WHO == "the user model.py", model.__file__
        assert jobs.WHO == "the user jobs package", jobs.__file__
        site = {str(site)!r}
        for module in (ldm_jobs, ldm_jobs.model, ldm_jobs.jobs):
            assert module.__file__.startswith(site), module.__file__
        pipe = load_pipeline("builtin:shapes")  # its weights and vocabulary, from the wheel
        assert pipe.native_size == (64, 64), pipe.native_size
        assert callable(open_output)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, check=True)
    return set(done.stdout.split())


def test_the_model_half_never_imports_the_jobs_half():
    # every inference module, seedless generate included, with the jobs half untouched
    names = sorted(p.stem for p in (Path(__file__).parent.parent / "model").glob("*.py")
                   if p.stem != "__init__")
    loaded = _modules_after("import ldm_jobs.model.{}\n".format(
        "\nimport ldm_jobs.model.".join(names)) +
        "from ldm_jobs import load_pipeline\n"
        "load_pipeline('builtin:tiny-random').generate(['a'], steps=1, width=16, height=16)")
    assert "torch" in loaded and "ldm_jobs.model.pipeline" in loaded
    assert not [name for name in loaded if name.startswith("ldm_jobs.jobs")]


def test_planning_and_prompt_text_need_no_torch():
    # the driver's side: spec, plan, rows, expansion and the CLI, which read prompts and
    # seeds with the model package's pure-Python parts
    loaded = _modules_after("import ldm_jobs.jobs.cli, ldm_jobs.jobs.plan, ldm_jobs.jobs.expand\n"
                            "import ldm_jobs.model.prompts, ldm_jobs.model.seeds")
    assert "ldm_jobs.model.prompts" in loaded and "ldm_jobs.jobs.rows" in loaded
    assert "torch" not in loaded
