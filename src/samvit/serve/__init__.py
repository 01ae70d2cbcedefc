"""`samvit serve`: SAM embeddings and masks over HTTP (FastAPI), with dynamic batching, a cache and a web page."""
from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
