"""road-export's version (pyproject's `version`), recorded in every file it writes (`road_export.version`)."""

__version__ = "0.1.0"
