"""aqua-pipeline: Zuora AQuA export results into S3, announced by completion events."""

__version__ = "0.1.0"
