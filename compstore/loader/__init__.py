"""From the store to live torch modules and diffusers pipelines.

Where a stored byte becomes a tensor: `tensors.stored_tensor` (a copy-on-write view
of a pack). Where tensors become a model: `component.build_model` (a clone of
the component's template, `warm`). Where models become a pipeline:
`pipeline.DiffusionPipeline.from_pretrained`. Where a tensor reaches a device:
`residency.ResidencyPool.serve` (a load) or `.move` (`pipe.to`), both uploading
through `upload.Uploader`.
"""

from .component import load_component, model_class
from .loading import exclusive_load
from .modular import ModularPipeline
from .pipeline import DiffusionPipeline, pipeline_class
from .residency import ResidencyPool, TransferReport, last_transfer, pool_for, to_device
from .single_file import SingleFileResult, ingest_single_file

__all__ = ["DiffusionPipeline", "ModularPipeline", "ResidencyPool", "SingleFileResult", "TransferReport",
           "exclusive_load", "ingest_single_file", "last_transfer", "load_component", "model_class", "pipeline_class", "pool_for", "to_device"]
