"""Generation Studio: see and measure what happens when an LLM writes a token or a diffusion model
paints an image. The core (backends, integrations, profiling, inspection) lives here; the lanes
live in `pipelines`, the app in `app.py`."""

__version__ = "0.1.0"
