"""The tiny SDXL pipeline's builder and sizes under their former module name (see tiny_pipelines)."""

from tiny_pipelines import SDXL_PROJECTION as PROJECTION  # noqa: F401
from tiny_pipelines import SDXL_SCHEDULER, build_tiny_sdxl_pipeline  # noqa: F401
from tiny_pipelines import SDXL_TEXT_WIDTH as TEXT_WIDTH  # noqa: F401
from tiny_pipelines import SDXL_TIME_EMBED as TIME_EMBED  # noqa: F401
