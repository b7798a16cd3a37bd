"""From the store to live torch modules and diffusers pipelines.

Where a stored byte becomes a tensor: `tensors.stored_tensor` (a copy-on-write view
of a pack). Where tensors become a model: `component.build_model`. Where models
become a pipeline: `pipeline.DiffusionPipeline.from_pretrained`.
"""

from .component import load_component
from .modular import ModularPipeline
from .pipeline import DiffusionPipeline

__all__ = ["DiffusionPipeline", "ModularPipeline", "load_component"]
