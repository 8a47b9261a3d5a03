"""fmserve — self-hosted foundation model serving with a Databricks-compatible API."""

__version__ = "0.1.0"
