"""The Gradio app: thin layers over the public pipeline API, no model logic here.

Depends on gradio, the pipelines and the studio core; nothing depends on it but app.py and the CLI.
"""

from __future__ import annotations

import gradio as gr
import torch

from studio import backends


def backends_rows(device: str | None = None, dtype: str | None = None) -> list[list[str]]:
    """One row per backend: name, kind, whether it runs here, and why not."""
    device = torch.device(device) if device else backends.default_device()
    dtype = getattr(torch, dtype) if dtype else None
    return [
        [b.name, b.kind, "yes" if b.available else "no", b.reason or "", b.description]
        for b in backends.available(device, dtype)
    ]


def build_app() -> gr.Blocks:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with gr.Blocks(title="Generation Studio") as app:
        gr.Markdown(
            "# Generation Studio\n"
            "The attention kernels and matmul precisions that both lanes run on, and whether each runs here."
        )
        with gr.Row():
            device = gr.Dropdown(devices, value=devices[-1], label="device")
            dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value=None, label="dtype (default: the device's)")
        table = gr.Dataframe(
            headers=["backend", "kind", "available", "why not", "what it is"],
            value=backends_rows(),
            interactive=False,
            wrap=True,
        )
        for control in (device, dtype):
            control.change(backends_rows, [device, dtype], table, api_name=False)
    return app
