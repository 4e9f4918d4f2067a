"""Reports written after the runs: the study report (``study``: HTML page with tables, curves and grids)."""
