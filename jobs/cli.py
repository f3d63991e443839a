"""`ldm-jobs` (and `python -m ldm_jobs`): run, submit, validate, show, schema.

Exit codes: 0 success; 1 the job ran but did not account for every row, or failed
(a shard kept failing, the model did not load, storage errors); 2 a bad spec or bad
input, reported before any work starts (argparse also exits 2 on bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldm_jobs.jobs.spec import JobSpec, SpecError, load_spec, parse_spec, spec_schema

# The project root travels to a remote cluster as the Ray Jobs working_dir.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never upload these: environments, outputs, caches and VCS data are large and local.
SUBMIT_EXCLUDES = [
    ".venv", "venv", "out", ".git", "__pycache__", "*.pyc", ".pytest_cache",
    ".ruff_cache", "*.egg-info", "build", "dist", "tmp",
]


class CliError(Exception):
    """A user-facing failure: print the message, exit with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# (module, exception class) -> exit code. Looked up in sys.modules when an error arrives,
# so a command never imports a module (Ray above all) just to name its errors.
ERROR_CODES: dict[tuple[str, str], int] = {
    ("ldm_jobs.jobs.spec", "SpecError"): 2,
    ("ldm_jobs.jobs.readers", "InputError"): 2,
    ("ldm_jobs.jobs.storage", "StorageError"): 1,
    ("ldm_jobs.jobs.report", "OutputError"): 1,
    ("ldm_jobs.jobs.runner", "JobFailed"): 1,
    ("ldm_jobs.jobs.gallery.site", "GalleryError"): 1,
    ("ldm_jobs.jobs.grid", "GridError"): 2,
}


def exit_code_for(error: BaseException) -> int | None:
    """The exit code of a known, user-facing error; None for a bug (show its traceback)."""
    for (module_name, class_name), code in ERROR_CODES.items():
        error_type = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(error_type, type) and isinstance(error, error_type):
            return code
    return None


def _read_spec(args: argparse.Namespace) -> JobSpec:
    if getattr(args, "spec_json", None):
        # `submit` ships the already-resolved spec inline, so the cluster runs exactly
        # what was validated on the submitting machine.
        try:
            data = json.loads(args.spec_json)
        except json.JSONDecodeError as error:
            raise SpecError(f"--spec-json: not valid JSON: {error}") from None
        return parse_spec(data, source="--spec-json")
    return load_spec(args.job, args.set)


def cmd_run(args: argparse.Namespace) -> int:
    spec = _read_spec(args)
    from ldm_jobs.jobs.runner import run_job  # Ray is imported only when a job runs

    manifest = run_job(
        spec, address=args.address, overwrite=args.overwrite, progress=not args.quiet
    )
    missing = unaccounted_rows(manifest)
    if missing or not manifest.get("complete", False):
        print(f"error: {missing} input row(s) are neither generated nor recorded as rejected "
              f"(missing shards: {', '.join(manifest.get('missing_shards', [])) or 'none'}); "
              "re-run the same command to resume", file=sys.stderr)
        return 1
    return 0


def unaccounted_rows(manifest: dict) -> int:
    """Input rows the manifest does not account for (neither generated nor rejected)."""
    counts = manifest["counts"]
    return max(0, int(counts["input_rows"]) - int(counts["accepted_rows"])
               - int(counts["rejected"]))


def submission_request(spec: JobSpec, *, overwrite: bool = False,
                       env: dict[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments of `JobSubmissionClient.submit_job` for this spec; `env`
    (from `--env`) becomes the job's environment variables on the cluster."""
    entrypoint = ["python", "-m", "ldm_jobs", "run", "--spec-json",
                  json.dumps(spec.model_dump(mode="json"), separators=(",", ":"))]
    if overwrite:
        entrypoint.append("--overwrite")
    runtime_env: dict[str, Any] = {"working_dir": str(PROJECT_ROOT),
                                   "excludes": list(SUBMIT_EXCLUDES)}
    if env:
        runtime_env["env_vars"] = dict(env)
    return {
        "entrypoint": shlex.join(entrypoint),
        "runtime_env": runtime_env,
        "metadata": {"ldm_jobs_name": spec.name},
    }


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def forwarded_env(names: Sequence[str]) -> dict[str, str]:
    """`submit --env NAME` values, read from this environment (never from the command
    line, so a secret stays out of shell history, logs and the manifest)."""
    env = {}
    for name in names:
        if not ENV_NAME.match(name):
            raise CliError(f"submit --env {name.split('=', 1)[0]}=...: give the variable's "
                           "name only; its value is read from this environment"
                           if "=" in name else f"submit --env {name!r}: not a variable name", 2)
        if name not in os.environ:
            raise CliError(f"submit --env {name}: {name} is not set in this environment", 2)
        env[name] = os.environ[name]
    return env


def submit_warnings(spec: JobSpec) -> list[str]:
    """Local paths that will not mean the same thing on a remote cluster."""
    warnings = []
    if "://" not in spec.output.path and Path(spec.output.path).is_absolute():
        warnings.append(f"output.path {spec.output.path!r} is local: the images are written to "
                        "that path on the cluster's machines (the head's disk on a one-node "
                        "cluster; with several nodes, each worker's own), not on this one; "
                        "use s3:// or a folder every node shares")
    elif "://" not in spec.output.path:
        warnings.append(f"output.path {spec.output.path!r} is relative: the images would stay "
                        "in the job's temporary working directory on the cluster; use s3://")
    path = Path(spec.input.path)
    first = path.parts[0] if path.parts else ""
    # A relative input under the project root travels with the working_dir upload.
    shipped = (not path.is_absolute() and Path.cwd().resolve() == PROJECT_ROOT
               and path.exists() and first not in SUBMIT_EXCLUDES)
    if "://" not in spec.input.path and not shipped:
        warnings.append(f"input.path {spec.input.path!r} is local and outside what is shipped "
                        "with the job (relative paths under the project root); use s3://")
    return warnings


def cmd_submit(args: argparse.Namespace) -> int:
    spec = _read_spec(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise CliError("submit: --address http://HEAD:8265 (or RAY_ADDRESS) is required", 2)
    env = forwarded_env(args.env)
    for warning in submit_warnings(spec):
        print(f"warning: {warning}", file=sys.stderr)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(**submission_request(spec, overwrite=args.overwrite,
                                                        env=env))
    except AuthenticationError as error:
        # Ray clusters started with token authentication (Ray's default since 2.5x) answer
        # 401/403; Ray's own `ray job submit` needs the same token and setting.
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unauthorized"
        from ldm_jobs.jobs.cluster import TOKEN_HINT

        raise CliError(f"submit to {address} failed: {first}. The cluster wants a Ray auth "
                       f"token: {TOKEN_HINT}, as `ray job submit` needs too") from None
    except (ConnectionError, RuntimeError) as error:
        # Ray raises RuntimeError both for an unreachable head and for a missing
        # ray[default] install; either way the message says what to do.
        raise CliError(f"submit to {address} failed: {error}") from None
    print(job_id)
    print(f"follow its logs:  ray job logs --address {address} --follow {job_id}",
          file=sys.stderr)
    print(f"its status:       ray job status --address {address} {job_id}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _read_spec(args)
    # Reads the input's schema, lists committed shards, probes the output and the model.
    from ldm_jobs.jobs.plan import check_model, make_plan, plan_warnings

    plan = make_plan(spec)
    check_model(spec)
    print(plan.describe())
    for warning in plan_warnings(spec):
        print(f"warning: {warning}", file=sys.stderr)
    from ldm_jobs.jobs.lora_check import check_loras  # loads the model only if LoRAs are named

    lines, loras_ok = check_loras(plan)
    if lines:
        print("\n".join(lines))
    return 0 if loras_ok else 2


def cmd_show(args: argparse.Namespace) -> int:
    from ldm_jobs.jobs.report import show

    if args.grid and not args.out:
        raise CliError("--grid needs --out FILE.png", 2)
    print(show(args.output, sheet=args.sheet))
    if args.html:
        from ldm_jobs.jobs.gallery import write_gallery

        print(write_gallery(args.output, args.html, full_images=args.full_images).describe())
    if args.grid:
        from ldm_jobs.jobs.grid import grid

        print(grid(args.output, args.grid, args.out, args.where))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(spec_schema(), indent=2))
    return 0


def _add_spec_args(parser: argparse.ArgumentParser, *, inline: bool = False) -> None:
    if inline:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("job", nargs="?", metavar="JOB.yaml", help="job spec (YAML or JSON)")
        source.add_argument("--spec-json", help=argparse.SUPPRESS)
    else:
        parser.add_argument("job", metavar="JOB.yaml", help="job spec (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a spec field, e.g. --set sampling.steps=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-jobs", description="Bulk latent-diffusion image generation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run or resume a job (local Ray unless --address)")
    _add_spec_args(run, inline=True)
    run.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    run.add_argument("--overwrite", action="store_true",
                     help="discard a previous run's output instead of resuming it")
    run.add_argument("--quiet", action="store_true", help="no progress line or summary")

    submit = sub.add_parser("submit", help="submit a job to a remote cluster (Ray Jobs API)")
    _add_spec_args(submit)
    submit.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--overwrite", action="store_true")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable (its value here) to the job, "
                        "e.g. --env AWS_ENDPOINT_URL (repeatable); credentials normally come "
                        "from the cluster's own role")

    validate = sub.add_parser("validate", help="check spec and input, print the plan")
    _add_spec_args(validate)

    show = sub.add_parser("show", help="summarise an output; optionally a contact sheet")
    show.add_argument("output", metavar="OUTPUT", help="output folder or s3:// prefix")
    show.add_argument("--sheet", metavar="FILE.png", help="write a contact sheet here")
    show.add_argument("--html", metavar="DIR", help="write (or update) a static gallery site "
                      "here, a folder or s3:// prefix; open DIR/index.html in a browser")
    show.add_argument("--full-images", choices=("copy", "webp", "none"), default="copy",
                      help="what the gallery's detail view shows: a copy of each image "
                      "(default), a WebP of it at its own size (a fraction of a PNG's "
                      "bytes), or the thumbnail only (the site then holds thumbnails alone)")
    show.add_argument("--grid", metavar="x=FIELD,y=FIELD", help="an X/Y grid (with --out)")
    show.add_argument("--out", metavar="FILE.png", help="where --grid writes its image")
    show.add_argument("--where", metavar="FIELD=VALUE", action="append", help="rows for --grid")

    sub.add_parser("schema", help="print the job spec's JSON schema")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "submit": cmd_submit,
    "validate": cmd_validate,
    "show": cmd_show,
    "schema": cmd_schema,
}


def interrupted_message(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What to say after Ctrl-C: how to resume. With --overwrite, re-running the same
    command would delete the shards kept so far, so the command to give drops it."""
    if getattr(args, "overwrite", False):
        again = shlex.join(["ldm-jobs", *(arg for arg in argv if arg != "--overwrite")])
        return ("interrupted; committed shards are kept. To resume, run the command without "
                f"--overwrite (with it, they would be deleted):\n  {again}")
    return "interrupted; committed shards are kept, re-run the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(interrupted_message(args, argv), file=sys.stderr)
        return 130
    except Exception as error:
        code = exit_code_for(error)
        if code is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
