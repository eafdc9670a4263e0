"""The Gradio app: both lanes side by side, the inspector and the benchmarks, as thin layers over
the public pipeline API. No model logic here: the lanes' events are rendered by ui.render.

Depends on gradio, the pipelines and the studio core; nothing depends on it but app.py and the CLI.
"""

from __future__ import annotations

import contextlib
import threading

import gradio as gr
import torch
from PIL import Image

from pipelines import LatentDiffusionPipeline, TextGenerationPipeline
from pipelines.remote import remote_from_env
from studio import assets, backends
from studio.profiling import ceilings_for

from . import inspector, render

try:  # on a Hugging Face ZeroGPU Space, each lane run gets a GPU for its duration
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


REMOTE = "remote (STUDIO_REMOTE_LLM)"


class Models:
    """The allow-listed models the app may load, each loaded once per device on first use.

    The hosted app never loads a path typed into the browser: only the names listed here.
    """

    def __init__(self, llm_names: list[str] | None = None, diffusion_names: list[str] | None = None, remote=None):
        self.llm_names = llm_names if llm_names is not None else assets.list_models("llm")
        self.diffusion_names = diffusion_names if diffusion_names is not None else assets.list_models("diffusion")
        # an OpenAI-compatible server the operator configured (STUDIO_REMOTE_LLM), shown as one more LLM
        self.remote = remote if remote is not None else remote_from_env()
        if self.remote is not None:
            self.llm_names = self.llm_names + [REMOTE]
        self._loaded: dict[tuple[str, str, str], object] = {}
        self._lock = threading.Lock()

    def llm(self, name: str, device: str) -> TextGenerationPipeline:
        if name == REMOTE and self.remote is not None:
            return self.remote
        return self._get("llm", name, device, self.llm_names, TextGenerationPipeline.from_pretrained)

    def diffusion(self, name: str, device: str) -> LatentDiffusionPipeline:
        return self._get("diffusion", name, device, self.diffusion_names, LatentDiffusionPipeline.from_pretrained)

    def _get(self, kind, name, device, allowed, load):
        if name not in allowed:
            raise gr.Error(f"{name!r} is not one of this app's {kind} models: {', '.join(allowed) or 'none'}")
        key = (kind, name, device)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load(name, device=device)
            return self._loaded[key]


OUT_OF_MEMORY = {
    "llm": "the LLM ran out of device memory: lower max new tokens or the prompt's length, turn the KV cache "
           "on, or choose a smaller precision (bf16, int8)",
    "diffusion": "the diffusion model ran out of device memory: lower the image size, use sequential CFG "
                 "(half the batch), or choose a smaller precision (fp16, int8)",
}


@contextlib.contextmanager
def request_errors(lane: str):
    """One request's failures as messages in the UI, the app serving on: bad input or a model that
    will not load (ValueError), and running out of device memory, after which the allocator's cache
    is emptied so the next request starts clean."""
    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise gr.Error(OUT_OF_MEMORY[lane]) from None
    except ValueError as error:
        raise gr.Error(str(error)) from None


def example_prompt(name: str | None) -> str:
    """A prompt the shipped model was made for (a class name for a class-conditional one)."""
    model = assets.load_manifest().get(name or "")
    return (model.example_prompt or "") if model else ""


def enlarged(image, side: int = 256):
    """A small image (a latent-resolution preview is 8 x 8 for the tiny DiT) scaled up with square
    pixels, so it is seen as it is rather than as a speck or a blur."""
    scale = max(1, side // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_rows(device: str | None = None, dtype: str | None = None) -> list[list[str]]:
    """One row per backend: name, kind, whether it runs here, and why not; then one per installed
    plugin package: what it registered, or why it failed to load."""
    device = torch.device(device) if device else backends.default_device()
    dtype = getattr(torch, dtype) if dtype else None
    rows = [
        [b.name, b.kind, "yes" if b.available else "no", b.reason or "", b.description]
        for b in backends.available(device, dtype)
    ]
    for s in backends.installed_plugins():
        registered = f"registers {', '.join(s.backends) or 'nothing'}" if s.error is None else "failed to load"
        rows.append([s.name, "plugin", "yes" if s.error is None else "no", s.error or "",
                     f"{s.distribution or s.value}: {registered}"])
    return rows


def _choices(kind: str, device: str) -> list[str]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [b.name for b in backends.available(torch.device(device), dtype) if b.kind == kind and b.available]


def build_app(models: Models | None = None) -> gr.Blocks:
    models = models or Models()
    default_device = devices()[-1]
    with gr.Blocks(title="Generation Studio") as app:
        gr.Markdown(
            "# Generation Studio\n"
            "An LLM writing tokens and a diffusion model painting an image, side by side, on the same "
            "attention and matmul backends — every step timed on this device."
        )
        with gr.Tab("Studio"):
            _studio_tab(models, default_device)
        with gr.Tab("Inspector"):
            inspector.inspector_tab(default_device)
        with gr.Tab("Benchmarks"):
            inspector.benchmarks_tab(models, default_device)
        with gr.Tab("Backends"):
            with gr.Row():
                device = gr.Dropdown(devices(), value=default_device, label="device")
                dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value=None, label="dtype (default: the device's)")
            table = gr.Dataframe(
                headers=["backend", "kind", "available", "why not", "what it is"],
                value=backends_rows(), interactive=False, wrap=True,
            )
            for control in (device, dtype):
                control.change(backends_rows, [device, dtype], table, api_name=False)
    return app


def _studio_tab(models: Models, default_device: str):
    with gr.Row(equal_height=False):
        device = gr.Dropdown(devices(), value=default_device, label="device", scale=1)
        attention = gr.Dropdown(["auto"] + [n for n in _choices("attention", default_device) if n != "auto"],
                                value="auto", label="attention kernel (both lanes)", scale=2)
        precision = gr.Dropdown(["model's own"] + _choices("precision", default_device), value="model's own",
                                label="matmul precision (both lanes)", scale=2)
        run_both = gr.Button("Run both", variant="primary", scale=1)
        stop = gr.Button("Stop", variant="stop", scale=1)

    llm_events = gr.State([])
    llm_stages = gr.State([])
    diffusion_stages = gr.State([])
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("## LLM lane\ntext → tokens → prefill → one decode step per token ↺")
            llm_model = gr.Dropdown(models.llm_names, value=(models.llm_names or [None])[0], label="model")
            llm_prompt = gr.Textbox(example_prompt(llm_model.value) or "The cat sat", label="prompt", lines=2,
                                    max_length=4000)
            with gr.Row():
                llm_mode = gr.Radio(["completion", "chat"], value="completion", label="prompt format")
                max_tokens = gr.Slider(1, 256, value=24, step=1, label="max new tokens")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
                top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
            with gr.Row():
                llm_seed = gr.Number(0, label="seed", precision=0, minimum=0)
                use_cache = gr.Checkbox(True, label="KV cache")
                speculative = gr.Dropdown(["off", "prompt-lookup", "self"], value="off", label="speculative decoding")
            llm_run = gr.Button("Generate", variant="primary")
            chips = gr.HTML(label="the prompt's tokens")
            stream = gr.HighlightedText(label="generated tokens (green: likely, red: unlikely) — click one",
                                        combine_adjacent=False, show_legend=False)
            alternatives = gr.BarPlot(x="token", y="probability", color="distribution", label="its top alternatives",
                                      sort=None, height=260, x_label_angle=-35,
                                      color_map={"model": "#4c78a8", "sampled": "#f28e2b"})
            llm_times = gr.BarPlot(x="step", y="ms", color="phase", label="device time per step", height=220, sort=None)
            llm_stats = gr.Markdown()
        with gr.Column():
            gr.Markdown("## Diffusion lane\nprompt → text encoder → denoiser × steps (× 2 with CFG) → VAE decode")
            img_model = gr.Dropdown(models.diffusion_names, value=(models.diffusion_names or [None])[0], label="model")
            img_prompt = gr.Textbox(example_prompt(img_model.value), label="prompt", lines=2, max_length=2000)
            negative = gr.Textbox("", label="negative prompt")
            with gr.Row():
                steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                guidance = gr.Slider(0, 15, value=5, step=0.5, label="guidance scale (1 = no CFG)")
            with gr.Row():
                scheduler = gr.Dropdown(["ddim", "euler", "euler-ancestral", "dpm-solver++", "pndm"], value="euler",
                                        label="scheduler")
                cfg_mode = gr.Radio(["batched", "sequential"], value="batched", label="CFG mode")
            with gr.Row():
                img_seed = gr.Number(0, label="seed", precision=0, minimum=0)
                size = gr.Dropdown(["model's own", 32, 64, 128, 256, 512], value="model's own", label="image size (pixels)")
            img_run = gr.Button("Generate", variant="primary")
            preview = gr.Image(label="x0 prediction at this step", type="pil", height=256)
            filmstrip = gr.Gallery(label="filmstrip", columns=10, height=140, preview=False)
            final = gr.Image(label="final image", type="pil", format="png", height=256)
            img_times = gr.BarPlot(x="step", y="ms", color="phase", label="device time per step", height=220, sort=None)
            img_stats = gr.Markdown()
    gr.Markdown("### Timeline: both lanes' stages, with the shapes that flow through them")
    timeline = gr.HTML(render.timeline([], []))
    gr.HTML(f"<style>{render.CSS}</style>")

    @gpu
    def run_llm(name, prompt, mode, max_new, temp, k, p, seed, cache, spec, dev, attn, prec):
        with request_errors("llm"):
            llm = models.llm(name, dev)
            events = []
            chips_html = ""
            ceilings = dtype = None  # a remote model's steps are wall-clock times on someone else's device
            if llm.timing_kind == "device":
                ceilings = ceilings_for(llm.device)
                dtype = next(llm.model.parameters()).dtype
            # the backends are read when stream() is called: this scope holds for the whole run,
            # and the shared, cached pipeline is left as it was
            with backends.use(attention=attn, precision=None if prec == "model's own" else prec):
                stream = llm.stream(
                    prompt, max_new_tokens=int(max_new), temperature=float(temp), top_k=int(k) or None,
                    top_p=float(p) if p < 1 else None, seed=int(seed or 0), use_cache=bool(cache),
                    chat=mode == "chat", speculative=None if spec == "off" else spec,
                )
            for ev in stream:
                events.append(ev)
                if ev.phase == "tokenize":
                    chips_html = render.token_chips(ev.tokens, ev.token_ids, llm.tokenizer)
                    continue
                yield (chips_html, render.token_stream(events), render.alternatives_table(ev),
                       render.step_times(events, ("prefill", "decode")), render.llm_counters(events, ceilings, dtype),
                       events, render.stages(events, "llm"))

    @gpu
    def run_diffusion(name, prompt, negative_prompt, n_steps, scale, sched, mode, seed, side, dev, attn, prec):
        with request_errors("diffusion"):
            pipe = models.diffusion(name, dev)
            events, strip = [], []
            ceilings = ceilings_for(pipe.device)
            dtype = pipe.dtype
            with backends.use(attention=attn, precision=None if prec == "model's own" else prec):
                stream = pipe.stream(
                    prompt, negative_prompt=negative_prompt or None, steps=int(n_steps), guidance_scale=float(scale),
                    scheduler=sched, cfg_mode=mode, seed=int(seed or 0),
                    height=None if side == "model's own" else int(side), width=None if side == "model's own" else int(side),
                )
            for ev in stream:
                events.append(ev)
                if ev.preview is not None:
                    strip.append((ev.preview, f"step {ev.index + 1}"))
                yield (enlarged(ev.preview) if ev.preview is not None else gr.skip(), strip,
                       ev.image if ev.image else gr.skip(),  # the real output, as the download should be
                       render.step_times(events, ("encode", "denoise", "decode")),
                       render.diffusion_counters(events, ceilings, dtype), render.stages(events, "diffusion"))

    def show_alternatives(events, evt: gr.SelectData):
        chosen = [e for e in events if e.token_id is not None]
        if evt.index is None or evt.index >= len(chosen):
            return gr.skip()
        return render.alternatives_table(chosen[evt.index])

    shared = [device, attention, precision]
    llm_inputs = [llm_model, llm_prompt, llm_mode, max_tokens, temperature, top_k, top_p, llm_seed, use_cache,
                  speculative] + shared
    llm_outputs = [chips, stream, alternatives, llm_times, llm_stats, llm_events, llm_stages]
    img_inputs = [img_model, img_prompt, negative, steps, guidance, scheduler, cfg_mode, img_seed, size] + shared
    img_outputs = [preview, filmstrip, final, img_times, img_stats, diffusion_stages]

    runs = []
    for trigger in (llm_run, run_both):
        event = trigger.click(run_llm, llm_inputs, llm_outputs, api_name="generate_text" if trigger is llm_run else False,
                              concurrency_limit=1, concurrency_id="llm")
        runs.append(event)
        event.then(render.timeline, [llm_stages, diffusion_stages], timeline, api_name=False)
    for trigger in (img_run, run_both):
        event = trigger.click(run_diffusion, img_inputs, img_outputs,
                              api_name="generate_image" if trigger is img_run else False,
                              concurrency_limit=1, concurrency_id="diffusion")
        runs.append(event)
        event.then(render.timeline, [llm_stages, diffusion_stages], timeline, api_name=False)
    stop.click(None, cancels=runs)
    stream.select(show_alternatives, [llm_events], alternatives, api_name=False)

    def refresh_choices(dev):
        return (gr.update(choices=["auto"] + [n for n in _choices("attention", dev) if n != "auto"], value="auto"),
                gr.update(choices=["model's own"] + _choices("precision", dev), value="model's own"))

    device.change(refresh_choices, device, [attention, precision], api_name=False)
    llm_model.change(example_prompt, llm_model, llm_prompt, api_name=False)
    img_model.change(example_prompt, img_model, img_prompt, api_name=False)
