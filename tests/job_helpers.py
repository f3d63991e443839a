"""Small helpers the job-system tests share."""

from __future__ import annotations

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
