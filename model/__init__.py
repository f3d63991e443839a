"""A from-scratch latent diffusion pipeline of the Stable Diffusion family."""

from .pipeline import Pipeline, load_pipeline

__all__ = ["Pipeline", "load_pipeline"]
