"""The tiny SD3 pipeline's builder and sequence length under their former module name (see tiny_pipelines)."""

from tiny_pipelines import SD3_MAX_SEQUENCE_LENGTH as MAX_SEQUENCE_LENGTH  # noqa: F401
from tiny_pipelines import build_tiny_sd3_pipeline  # noqa: F401
