"""Bulk latent-diffusion image generation from prompt tables, on Ray."""

from .report import Output, open_output, show
from .spec import JobSpec, SpecError, load_spec

__all__ = ["JobSpec", "Output", "SpecError", "load_spec", "open_output", "show"]
