"""The Gradio app: both lanes side by side, the inspector and the benchmarks, as thin layers over
the public pipeline API. No model logic here: the lanes' events are rendered by ui.render and
their inputs checked by ui.inputs.

The first screen shows the lanes working: each lane's prompt and Generate button, then its output
(the prompt's tokens and the token stream; the x0 preview and the image) and its per-step chart;
the settings wait in closed accordions underneath.

Depends on gradio, the pipelines and the studio core; nothing depends on it but app.py and the CLI.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from pipelines.fast_decode import wants_fast_path
from studio import assets, backends
from studio.profiling import ceilings_for

from . import inputs, inspector, render
from .models import Models

try:  # on a Hugging Face ZeroGPU Space, each lane run gets a GPU for its duration
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


log = logging.getLogger(__name__)

MODELS_OWN = "model's own"
IMAGE_SIZES = [MODELS_OWN, "32", "64", "128", "256", "512"]  # strings, as the API lists a dropdown's choices
SCHEDULERS = ["ddim", "euler", "euler-ancestral", "dpm-solver++", "pndm"]
SPECULATIVE = ["off", "prompt-lookup", "self"]
ADAPTER_SCALE_MAX = 1.5
NO_ADAPTER = "none"  # the adapter choice that runs the base model
COMPARE = "compare with the base model"  # the same prompt and seed without the adapter, side by side
LLM_PROMPT_CHARS, IMAGE_PROMPT_CHARS = 4000, 2000


OUT_OF_MEMORY = {
    "llm": "the LLM ran out of device memory: lower max new tokens or the prompt's length, turn the KV cache "
           "on, or choose a smaller precision (bf16, int8)",
    "diffusion": "the diffusion model ran out of device memory: lower the image size, use sequential CFG "
                 "(half the batch), or choose a smaller precision (fp16, int8)",
}


@contextlib.contextmanager
def request_errors(lane: str):
    """One request's failures as messages in the UI, the app serving on: bad input or a model that
    will not load (ValueError), running out of device memory (after which the allocator's cache
    is emptied so the next request starts clean), and anything else with its first line."""
    try:
        yield
    except gr.Error:
        raise
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise gr.Error(OUT_OF_MEMORY[lane]) from None
    except ValueError as error:
        raise gr.Error(str(error)) from None
    except Exception as error:
        log.exception("the %s lane failed", lane)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise gr.Error(f"the {lane} lane failed ({type(error).__name__}: {first}); try other settings, "
                       "and report it if it happens again") from None


def example_prompt(name: str | None) -> str:
    """A prompt the shipped model was made for (a class name for a class-conditional one)."""
    return (assets.example_prompts(name) or [""])[0]


def examples(names: list[str]) -> list[list[str]]:
    """[model, prompt] rows: a few prompts each shipped model was made for."""
    return [[name, prompt] for name in names for prompt in assets.example_prompts(name)[:6]]


def enlarged(image, side: int = 256):
    """A small image (a latent-resolution preview is 8 x 8 for the tiny DiT) scaled up with square
    pixels, so it is seen as it is rather than as a speck or a blur."""
    scale = max(1, side // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


class Filmstrip:
    """One run's previews as PNG files in Gradio's cache, each written once under a name of its own
    (renamed into place, so never seen half-written) and never rewritten.

    The gallery is handed these paths, not images: Gradio rewrites an image's cache file on every
    update that lists it, and a browser fetching one of them meanwhile got a truncated file and
    showed a broken thumbnail. A path already in the cache is served as it is."""

    def __init__(self, cache: str | Path):
        Path(cache).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="filmstrip-", dir=cache))
        self.frames: list[tuple[str, str]] = []

    def add(self, image, caption: str) -> list[tuple[str, str]]:
        path = self.folder / f"{len(self.frames):03d}.png"
        scratch = path.with_suffix(".tmp")
        enlarged(image, 128).save(scratch, format="png")
        scratch.replace(path)
        self.frames.append((str(path), caption))
        return list(self.frames)


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




class StudioApp(gr.Blocks):
    """The studio's Blocks: launched, it shows every failure with its message (show_error), so an
    error Gradio raises before a lane runs (too few arguments) is readable too, never `{"error": null}`."""

    def launch(self, *args, show_error: bool = True, **kwargs):
        return super().launch(*args, show_error=show_error, **kwargs)


def build_app(models: Models | None = None, warm_up: bool = True) -> gr.Blocks:
    """The app; warm_up loads the default LLM and compiles its decode step in the background."""
    models = models or Models()
    default_device = devices()[-1]
    with StudioApp(title="Generation Studio", fill_width=True) as app:
        gr.Markdown(
            "**Generation Studio** — an LLM writing tokens and a diffusion model painting an image, side by side, "
            "on the same attention and matmul backends; every step timed on this device.",
            elem_id="studio-title",
        )
        with gr.Tab("Studio"):
            _studio_tab(models, default_device)
        with gr.Tab("Inspector"):
            inspector.inspector_tab(models, default_device)
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
        gr.HTML(f"<style>{render.CSS}</style>")
    if warm_up:  # after the tabs exist: the Benchmarks tab's progress patches tqdm, which loading uses
        models.warm_up(default_device)
    return app


def _studio_tab(models: Models, default_device: str):
    with gr.Row(equal_height=True, elem_id="studio-bar"):
        device = gr.Dropdown(devices(), value=default_device, label="device", scale=1, min_width=100)
        attention = gr.Dropdown(["auto"] + [n for n in _choices("attention", default_device) if n != "auto"],
                                value="auto", label="attention kernel (both lanes)", scale=2, min_width=160)
        precision = gr.Dropdown([MODELS_OWN] + _choices("precision", default_device), value=MODELS_OWN,
                                label="matmul precision (both lanes)", scale=2, min_width=160)
        run_both = gr.Button("Run both", variant="primary", scale=1, min_width=100)
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)

    llm_events = gr.State([])
    llm_stages = gr.State([])
    diffusion_stages = gr.State([])
    with gr.Row(equal_height=False):
        with gr.Column(elem_classes=["lane"]):
            gr.Markdown("#### LLM lane · text → tokens → prefill → one decode step per token ↺")
            with gr.Row(equal_height=True):
                llm_model = gr.Dropdown(models.llm_names, value=(models.llm_names or [None])[0], label="model",
                                        scale=3, min_width=150, elem_id="llm-model")
                llm_prompt = gr.Textbox(example_prompt(llm_model.value) or "The cat sat", label="prompt", lines=1,
                                        max_lines=6, max_length=LLM_PROMPT_CHARS, scale=5)
                llm_run = gr.Button("Generate", variant="primary", scale=1, min_width=90)
            with gr.Row(equal_height=True):
                llm_adapter = gr.Dropdown(adapter_choices(models, "llm", llm_model.value), value=NO_ADAPTER,
                                          label="LoRA adapter (made for this model)", scale=3, min_width=150,
                                          elem_id="llm-adapter")
                llm_compare = gr.Checkbox(False, label=COMPARE, scale=2, min_width=150, elem_id="llm-compare-toggle")
            with gr.Accordion("settings: format, max tokens, sampling, seed, KV cache, speculative; examples",
                              open=False):
                with gr.Row():
                    llm_mode = gr.Radio(["completion", "chat"], value="completion", label="prompt format")
                    max_tokens = gr.Slider(1, 256, value=24, step=1, label="max new tokens")
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
                    top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p")
                with gr.Row():
                    llm_seed = gr.Number(0, label="seed (empty: 0)", precision=0, minimum=0)
                    use_cache = gr.Checkbox(True, label="KV cache")
                    speculative = gr.Dropdown(SPECULATIVE, value="off", label="speculative decoding")
                if examples(models.llm_names):
                    gr.Examples(examples(models.llm_names), [llm_model, llm_prompt], label="prompts the models were made for")
            chips = gr.HTML(label="the prompt's tokens", elem_id="llm-chips")
            stream = gr.HighlightedText(label="generated tokens (green: likely, red: unlikely) — click one",
                                        combine_adjacent=False, show_legend=False, elem_id="llm-stream")
            with gr.Column(visible=False) as llm_compare_box:
                llm_comparison = gr.HTML(label="the same prompt and seed without and with the adapter",
                                         elem_id="llm-compare")
            llm_times = gr.BarPlot(x="step", y="ms", color="phase", label="LLM: device time per step", height=200,
                                   sort=None, elem_id="llm-times")
            llm_stats = gr.Markdown(elem_id="llm-counters")
            alternatives = gr.BarPlot(x="token", y="probability", color="distribution", label="its top alternatives",
                                      sort=None, height=260, x_label_angle=-35,
                                      color_map={"model": "#4c78a8", "sampled": "#f28e2b"})
        with gr.Column(elem_classes=["lane"]):
            gr.Markdown("#### Diffusion lane · prompt → text encoder → denoiser × steps (× 2 with CFG) → VAE")
            with gr.Row(equal_height=True):
                img_model = gr.Dropdown(models.diffusion_names, value=(models.diffusion_names or [None])[0],
                                        label="model", scale=3, min_width=150, elem_id="diffusion-model")
                img_prompt = gr.Textbox(example_prompt(img_model.value), label="prompt", lines=1, max_lines=4,
                                        max_length=IMAGE_PROMPT_CHARS, scale=5)
                img_run = gr.Button("Generate", variant="primary", scale=1, min_width=90)
            with gr.Row(equal_height=True):
                img_adapter = gr.Dropdown(adapter_choices(models, "diffusion", img_model.value), value=NO_ADAPTER,
                                          label="LoRA adapter (made for this model)", scale=2, min_width=150,
                                          elem_id="diffusion-adapter")
                img_adapter_scale = gr.Slider(0, ADAPTER_SCALE_MAX, value=1, step=0.05, label="adapter scale",
                                              scale=2, min_width=120)
                img_compare = gr.Checkbox(False, label=COMPARE, scale=2, min_width=150,
                                          elem_id="diffusion-compare-toggle")
            with gr.Accordion("settings: negative prompt, steps, guidance, scheduler, CFG, seed, size; examples",
                              open=False):
                negative = gr.Textbox("", label="negative prompt", max_length=IMAGE_PROMPT_CHARS)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                    guidance = gr.Slider(0, 15, value=5, step=0.5, label="guidance scale (1 = no CFG)")
                with gr.Row():
                    scheduler = gr.Dropdown(SCHEDULERS, value="euler", label="scheduler")
                    cfg_mode = gr.Radio(["batched", "sequential"], value="batched", label="CFG mode")
                with gr.Row():
                    img_seed = gr.Number(0, label="seed (empty: 0)", precision=0, minimum=0)
                    size = gr.Dropdown(IMAGE_SIZES, value=MODELS_OWN, label="image size (pixels)")
                if examples(models.diffusion_names):
                    gr.Examples(examples(models.diffusion_names), [img_model, img_prompt],
                                label="prompts the models were made for")
            with gr.Row(equal_height=True):
                # shown enlarged with square pixels (CSS: .pixels); the files are the real images
                preview = gr.Image(label="x0 prediction at this step", type="pil", height=240, elem_id="x0-preview",
                                   elem_classes=["pixels"])
                final = gr.Image(label="final image (downloads at its real size)", type="pil", format="png",
                                 height=240, elem_id="final-image", elem_classes=["pixels"])
            with gr.Column(visible=False) as img_compare_box:
                with gr.Row(equal_height=True):
                    image_without = gr.Image(label="without the adapter (same prompt and seed)", type="pil",
                                             format="png", height=200, elem_id="image-without", elem_classes=["pixels"])
                    image_with = gr.Image(label="with the adapter", type="pil", format="png", height=200,
                                          elem_id="image-with", elem_classes=["pixels"])
                strip_without = gr.Gallery(label="x0 per step without the adapter", columns=10, height=120,
                                           preview=False, elem_id="filmstrip-without")
                strip_with = gr.Gallery(label="x0 per step with the adapter (Δ: mean pixel difference from the same "
                                              "step without it, out of 255)", columns=10, height=120, preview=False,
                                        elem_id="filmstrip-with")
            img_times = gr.BarPlot(x="step", y="ms", color="phase", label="diffusion: device time per step",
                                   height=200, sort=None, elem_id="diffusion-times")
            img_stats = gr.Markdown(elem_id="diffusion-counters")
            filmstrip = gr.Gallery(label="filmstrip: the x0 prediction of every step", columns=10, height=140,
                                   preview=False, elem_id="filmstrip")
    gr.Markdown("### Timeline: both lanes' stages, with the shapes that flow through them")
    timeline = gr.HTML(render.timeline([], []))

    @gpu
    def run_llm(name, prompt, mode, max_new, temp, k, p, seed, cache, spec, adapter, compare, dev, attn, prec):
        # the inputs arrive as sent (preprocess=False): each is checked here, with a message
        with request_errors("llm"):
            dev = inputs.choice(dev, "device", devices())
            name = inputs.choice(name, "model", models.llm_names)
            prompt = inputs.text(prompt, "the prompt", LLM_PROMPT_CHARS)
            mode = inputs.choice(mode, "prompt format", ["completion", "chat"])
            max_new = inputs.number(max_new, "max new tokens", 1, 256, whole=True)
            temp = inputs.number(temp, "temperature", 0, 2)
            k = inputs.number(k, "top-k", 0, 200, whole=True)
            p = inputs.number(p, "top-p", 0.05, 1)
            seed = inputs.number(seed, "seed", 0, 2**63 - 1, whole=True, empty=0)
            cache = inputs.flag(cache, "KV cache")
            spec = inputs.choice(spec, "speculative decoding", SPECULATIVE)
            adapter, compare = checked_adapter("llm", name, adapter, compare)
            attn = inputs.choice(attn, "attention kernel", ["auto"] + _choices("attention", dev))
            prec = inputs.choice(prec, "matmul precision", [MODELS_OWN] + _choices("precision", dev))
            llm = models.llm(name, dev)
            if adapter is not None:
                adapter = models.with_adapter("llm", name, dev, adapter)
            # the adapter runs in the plain loop; compared, the base runs in it too, so that only
            # the adapter differs between the two
            lane = dict(adapter=adapter) if adapter else {}
            if compare:
                lane["fast_path"] = False
            events, without = [], []
            chips_html = ""
            ceilings = dtype = None  # a remote model's steps are wall-clock times on someone else's device
            fast = None
            if llm.timing_kind == "device":
                ceilings = ceilings_for(llm.device)
                dtype = next(llm.model.parameters()).dtype
                fast = wants_fast_path(llm, lane.get("fast_path"), cache, None if spec == "off" else spec, adapter)
            # the backends are read when stream() is called: this scope holds for the whole run,
            # and the shared, cached pipeline is left as it was
            settings = dict(max_new_tokens=max_new, temperature=temp, top_k=k or None, top_p=p if p < 1 else None,
                            seed=seed, use_cache=cache, chat=mode == "chat",
                            speculative=None if spec == "off" else spec)
            with backends.use(attention=attn, precision=None if prec == MODELS_OWN else prec):
                stream = llm.stream(prompt, **settings, **lane)
                base = llm.stream(prompt, **settings, fast_path=False) if compare else iter(())
            notices = []
            # the two runs step together (each model call enters its own adapter), so the
            # comparison grows token by token
            for ev, base_ev in itertools.zip_longest(stream, base):
                without += [base_ev] if base_ev is not None else []
                events += [ev] if ev is not None else []
                comparison = render.token_comparison(without, events, adapter) if compare else ""
                if ev is None:  # the run with the adapter stopped first: only the comparison goes on
                    yield (gr.skip(),) * 7 + (comparison,)
                    continue
                if ev.notice:  # said once by the lane, e.g. that the fast path fell back
                    gr.Warning(ev.notice)
                    notices.append(f"⚠ {ev.notice}")
                if ev.phase == "tokenize":
                    chips_html = render.token_chips(ev.tokens, ev.token_ids, llm.tokenizer)
                    continue
                counters = render.llm_counters(events, ceilings, dtype, runtime=runtime_lines(llm, fast) + notices)
                yield (chips_html, render.token_stream(events), render.alternatives_table(ev),
                       render.step_times(events, ("prefill", "decode")), counters, events, render.stages(events, "llm"),
                       comparison)

    @gpu
    def run_diffusion(name, prompt, negative_prompt, n_steps, scale, sched, mode, seed, side, adapter, adapter_scale,
                      compare, dev, attn, prec):
        with request_errors("diffusion"):
            dev = inputs.choice(dev, "device", devices())
            name = inputs.choice(name, "model", models.diffusion_names)
            prompt = inputs.text(prompt, "the prompt", IMAGE_PROMPT_CHARS)
            negative_prompt = inputs.text("" if negative_prompt is None else negative_prompt, "the negative prompt",
                                          IMAGE_PROMPT_CHARS)
            n_steps = inputs.number(n_steps, "steps", 1, 100, whole=True)
            scale = inputs.number(scale, "guidance scale", 0, 15)
            sched = inputs.choice(sched, "scheduler", SCHEDULERS)
            mode = inputs.choice(mode, "CFG mode", ["batched", "sequential"])
            seed = inputs.number(seed, "seed", 0, 2**63 - 1, whole=True, empty=0)
            side = inputs.choice(side if side is not None else MODELS_OWN, "image size", IMAGE_SIZES)
            adapter, compare = checked_adapter("diffusion", name, adapter, compare)
            adapter_scale = inputs.number(adapter_scale, "adapter scale", 0, ADAPTER_SCALE_MAX)
            attn = inputs.choice(attn, "attention kernel", ["auto"] + _choices("attention", dev))
            prec = inputs.choice(prec, "matmul precision", [MODELS_OWN] + _choices("precision", dev))
            pipe = models.diffusion(name, dev)
            if adapter is not None:
                adapter = models.with_adapter("diffusion", name, dev, adapter)
            side = None if side == MODELS_OWN else int(side)
            events, strip = [], Filmstrip(filmstrip.GRADIO_CACHE)
            pair = ComparedFilmstrips(filmstrip.GRADIO_CACHE) if compare else None
            ceilings = ceilings_for(pipe.device)
            settings = dict(negative_prompt=negative_prompt or None, steps=n_steps, guidance_scale=scale,
                            scheduler=sched, cfg_mode=mode, seed=seed, height=side, width=side)
            with backends.use(attention=attn, precision=None if prec == MODELS_OWN else prec):
                stream = pipe.stream(prompt, **settings, adapter=adapter, adapter_scale=adapter_scale)
                base = pipe.stream(prompt, **settings) if compare else iter(())
            for ev, base_ev in itertools.zip_longest(stream, base):  # step by step, as in run_llm
                compared = pair.add(base_ev, ev) if pair else (None,) * 4
                if ev is None:
                    yield (gr.skip(),) * 6 + compared
                    continue
                events.append(ev)
                frames = list(strip.frames) if ev.preview is None else strip.add(ev.preview, f"step {ev.index + 1}")
                yield (enlarged(ev.preview) if ev.preview is not None else gr.skip(), frames,
                       ev.image if ev.image else gr.skip(),  # the real image: the download gives it
                       render.step_times(events, ("encode", "denoise", "decode")),
                       render.diffusion_counters(events, ceilings, pipe.dtype, diffusion_runtime_lines(pipe)),
                       render.stages(events, "diffusion"),
                       *compared)

    def checked_adapter(kind, name, adapter, compare):
        """The adapter chosen for a lane's model (None: the base model) and whether to compare."""
        adapter = inputs.choice(adapter, "adapter", [NO_ADAPTER] + models.adapter_names(kind, name))
        compare = inputs.flag(compare, "compare")
        if compare and adapter == NO_ADAPTER:
            raise ValueError("compare runs the prompt with and without a LoRA adapter: choose an adapter first")
        return (None if adapter == NO_ADAPTER else adapter), compare

    def show_alternatives(events, evt: gr.SelectData):
        chosen = [e for e in events if e.token_id is not None]
        if evt.index is None or evt.index >= len(chosen):
            return gr.skip()
        return render.alternatives_table(chosen[evt.index])

    shared = [device, attention, precision]
    llm_inputs = [llm_model, llm_prompt, llm_mode, max_tokens, temperature, top_k, top_p, llm_seed, use_cache,
                  speculative, llm_adapter, llm_compare] + shared
    llm_outputs = [chips, stream, alternatives, llm_times, llm_stats, llm_events, llm_stages, llm_comparison]
    img_inputs = [img_model, img_prompt, negative, steps, guidance, scheduler, cfg_mode, img_seed, size, img_adapter,
                  img_adapter_scale, img_compare] + shared
    img_outputs = [preview, filmstrip, final, img_times, img_stats, diffusion_stages, image_without, image_with,
                   strip_without, strip_with]

    runs = []
    for trigger in (llm_run, run_both):
        event = trigger.click(run_llm, llm_inputs, llm_outputs, api_name="generate_text" if trigger is llm_run else False,
                              concurrency_limit=1, concurrency_id="llm", preprocess=False)
        runs.append(event)
        event.then(render.timeline, [llm_stages, diffusion_stages], timeline, api_name=False)
    for trigger in (img_run, run_both):
        event = trigger.click(run_diffusion, img_inputs, img_outputs,
                              api_name="generate_image" if trigger is img_run else False,
                              concurrency_limit=1, concurrency_id="diffusion", preprocess=False)
        runs.append(event)
        event.then(render.timeline, [llm_stages, diffusion_stages], timeline, api_name=False)
    stop.click(None, cancels=runs)
    stream.select(show_alternatives, [llm_events], alternatives, api_name=False)

    def refresh_choices(dev):
        return (gr.update(choices=["auto"] + [n for n in _choices("attention", dev) if n != "auto"], value="auto"),
                gr.update(choices=[MODELS_OWN] + _choices("precision", dev), value=MODELS_OWN))

    device.change(refresh_choices, device, [attention, precision], api_name=False)
    # .input, not .change: picking an example sets the model and its prompt together; a model with
    # no example prompts (an operator's) keeps the prompt typed
    for model, prompt in ((llm_model, llm_prompt), (img_model, img_prompt)):
        model.input(lambda name: example_prompt(name) or gr.skip(), model, prompt, api_name=False)
    # .change: an example that sets the model refreshes its adapters too
    llm_model.change(lambda name: adapter_update(models, "llm", name), llm_model, llm_adapter, api_name=False)
    img_model.change(lambda name: adapter_update(models, "diffusion", name), img_model, img_adapter, api_name=False)
    llm_compare.change(lambda on: gr.update(visible=on), llm_compare, llm_compare_box, api_name=False)
    img_compare.change(lambda on: gr.update(visible=on), img_compare, img_compare_box, api_name=False)


def adapter_choices(models: Models, kind: str, name: str | None) -> list[str]:
    """A lane's adapter choices for its model: none (the base model), then those offered with it."""
    return [NO_ADAPTER] + (models.adapter_names(kind, name) if name else [])


def adapter_update(models: Models, kind: str, name: str):
    return gr.update(choices=adapter_choices(models, kind, name), value=NO_ADAPTER)


class ComparedFilmstrips:
    """A run and its base run side by side: the two final images, and the two filmstrips of x0
    previews, each step of the adapter's captioned with how far it is from the base's."""

    def __init__(self, cache: str | Path):
        self.without, self.with_ = Filmstrip(cache), Filmstrip(cache)
        self.previews = {}  # the base run's previews by step, to measure the adapter's against

    def add(self, without, adapted) -> tuple:
        """The compare outputs after one step of each run (either may have ended): (image without,
        image with, filmstrip without, filmstrip with)."""
        if without is not None and without.preview is not None:
            self.previews[without.index] = without.preview
            self.without.add(without.preview, f"step {without.index + 1}")
        if adapted is not None and adapted.preview is not None:
            base = self.previews.get(adapted.index)
            delta = f" Δ{render.pixel_difference(base, adapted.preview):.0f}" if base is not None else ""
            self.with_.add(adapted.preview, f"step {adapted.index + 1}{delta}")
        images = [ev.image if ev is not None and ev.image is not None else gr.skip() for ev in (without, adapted)]
        # every update lists the frames so far (written once, never rewritten): the last one, which an
        # API client gets, holds them all
        return (*images, list(self.without.frames), list(self.with_.frames))


def runtime_lines(llm, fast: bool | None) -> list[str]:
    """What the LLM ran on besides the model: the fast path's state (its weights, whether the step
    is compiled yet) or why the plain loop ran, and the CPU's thread count."""
    if fast is None:  # a remote model
        return []
    if llm.fast_path_error:
        lines = [f"plain loop: {llm.fast_path_error}"]
    elif not fast:
        lines = ["plain loop: the fast path does not run this model or these settings (KV cache off, speculative, "
                 "a LoRA adapter, compare)"]
    else:
        lines = [llm.fast_decoder.status() if llm.fast_decoder is not None else "fast path"]
    return lines + cpu_threads_lines(llm.device)


def diffusion_runtime_lines(pipe) -> list[str]:
    """The same for the diffusion model: its fast path's state, and the CPU's thread count."""
    lines = [pipe.fast_path_report.status()] if pipe.fast_path_report is not None else ["fast path off"]
    return lines + cpu_threads_lines(pipe.device)


def cpu_threads_lines(device: torch.device) -> list[str]:
    return [f"CPU threads: {torch.get_num_threads()} (torch.get_num_threads())"] if device.type == "cpu" else []
