"""The tiny Flux pipeline's builder, scheduler and sizes under their former module name (see tiny_pipelines)."""

from tiny_pipelines import FLUX_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH  # noqa: F401
from tiny_pipelines import FLUX_RESOLUTION as RESOLUTION  # noqa: F401
from tiny_pipelines import build_tiny_flux_pipeline, tiny_flux_scheduler  # noqa: F401
