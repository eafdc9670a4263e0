"""The diffusion rows of `studio bench`: the diffusion lane per attention kernel, precision and CFG
mode (batched, sequential, off; previews on/off), next to the stock diffusers pipeline built from
the same components. Also what the inspector predicted for the model against what was measured.

Depends on torch, studio.backends, studio.inspector and studio.bench.measure / .shapes / .results;
imports the diffusion pipeline, diffusers and the integrations inside its functions, as a consumer
of the lanes. Never imports another lane of the bench, the goals, the report or the UI.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
from time import perf_counter

import torch

from studio import backends, inspector
from studio.bench.measure import (
    MemoryDelta,
    PeakMemory,
    median_spread,
    paired_overhead,
    relative_error,
    synchronize,
    tensor_bytes,
    touch,
)
from studio.bench.results import (
    DEFAULT_DIFFUSION,
    TILED_MAX_BLOCK_PAIRS,
    Results,
    Settings,
    attention_grid,
    dtype_name,
    first_line,
    jsonable,
    matmul_peak,
    or_failed,
    peak_key,
    precision_grid,
    table_row,
    wants,
)
from studio.adapters import merged, random_adapter
from studio.bench.shapes import build_diffusion_shape, reference_name


_IMAGE_PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "a cat wearing a hat", "a bowl of ramen"]
_CLASS_PROMPTS = ["207", "360", "387", "974"]  # class ids: DiT-style models take a class, not text


class DiffusionBench:
    """One diffusion model: every lane variant, and the stock diffusers pipeline next to them."""

    def __init__(self, settings: Settings, results: Results, name: str, shape: bool):
        self.settings, self.results, self.name, self.shape = settings, results, name, shape
        self.device = results.device
        self.pipe = None
        self.error: str | None = None
        self.model_name = f"{name} (random weights)" if shape else name
        self.stock_step_ms: float | None = None

    def tasks(self):
        rows = self.settings.diffusion_rows
        tasks = [(f"load {self.model_name}", self.load)]
        # the stock pipeline first, while the components are as diffusers built them (the fast path
        # fuses and re-lays them in place, which a stock row must not benefit from)
        if wants(rows, "stock"):
            tasks.append((f"{self.name}: stock diffusers", lambda: self.stock(compiled=False)))
        if wants(rows, "stock-compiled"):
            tasks.append((f"{self.name}: stock diffusers compiled", lambda: self.stock(compiled=True)))
        for variant in self.variants():
            tasks.append((f"{self.name}: {self._label(variant)}", lambda v=variant: self.row(v)))
        tasks.append((f"{self.name}: free", self.free))
        return tasks

    def variants(self) -> list[dict]:
        """The lane's rows, in the order their layouts allow: the plain path, then the device's
        default (the fast path on CUDA, the plain path on the CPU) and its variants, then compiled."""
        on_cuda = self.device.type == "cuda"
        default = dict(row="default", fast_path="on" if on_cuda else "off", attention="auto", precision=None,
                       cfg="batched", preview=None, adapter=None)
        rows = [dict(default, row="plain", fast_path="off",
                     skip=None if on_cuda else "on the CPU the lane's default is the plain path (the default row)")]
        rows.append(dict(default))
        dtype = torch.float16 if on_cuda else torch.float32
        for kernel, reason in attention_grid(self.settings, self.device, dtype, "diffusion"):
            if kernel != "auto":
                rows.append(dict(default, row="kernels", attention=kernel, skip=reason))
        for precision, reason in precision_grid(self.settings, self.device, dtype):
            if precision is not None:
                rows.append(dict(default, row="precisions", precision=precision, skip=reason))
        rows.append(dict(default, row="sequential", cfg="sequential"))
        rows.append(dict(default, row="cfg-off", cfg="off"))
        rows.append(dict(default, row="previews", preview="linear", paired={"preview": None}))
        rows.append(dict(default, row="adapter", adapter="unmerged"))
        rows.append(dict(default, row="adapter", adapter="merged"))
        rows.append(dict(default, row="compiled", fast_path="compiled"))
        return [row for row in rows if wants(self.settings.diffusion_rows, row["row"])]

    @staticmethod
    def _label(v: dict) -> str:
        return (f"attention={v['attention']} precision={v['precision'] or 'native'} cfg={v['cfg']} "
                f"fast path={v['fast_path']}" + (f" preview={v['preview']}" if v["preview"] else "")
                + (f" LoRA {v['adapter']}" if v["adapter"] else ""))

    def _lay_out(self, fast_path: str) -> float | None:
        """Put the pipeline in the row's layout; returns the compile seconds where it compiled. The
        fast path changes the pipeline in place, for good: rows come in the order that allows."""
        from pipelines.fast_diffusion import enable_fast_path, warm_up

        report = self.pipe.fast_path_report
        if fast_path == "off":
            if report is not None:
                raise ValueError("the fast path is already on: a plain row must run before it")
            return None
        enable_fast_path(self.pipe, compile=fast_path == "compiled")
        if fast_path != "compiled" or self.pipe.fast_path_report.compile_s is not None:
            return None
        kwargs = dict(steps=2, guidance_scale=5.0, height=self.image[0], width=self.image[1], preview=None)
        return warm_up(self.pipe, self._prompts()[0], **kwargs)

    def load(self):
        from studio import assets

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if not self.shape and self.name == DEFAULT_DIFFUSION and self.name not in assets.list_models("diffusion"):
            self.error = (f"the shipped default diffusion model {self.name!r} is not in assets/manifest.json yet "
                          "(not trained yet); pass --diffusion MODEL or --shape NAME")
            raise ValueError(self.error)
        try:
            with MemoryDelta(self.device) as delta:
                if self.shape:
                    self.pipe = build_diffusion_shape(self.name, self.device, dtype)
                else:
                    from pipelines.latent_diffusion import LatentDiffusionPipeline

                    self.pipe = LatentDiffusionPipeline.from_pretrained(self.name, device=self.device, fast_path=False)
                for model in (self.pipe.denoiser, self.pipe.vae, self.pipe.text_encoder):
                    touch(model)
        except (ValueError, OSError) as error:
            self.error = first_line(error)
            raise
        pipe = self.pipe
        config = {"_class_name": type(pipe.denoiser).__name__, **dict(pipe.denoiser.config)}
        components = {"vae": {"_class_name": type(pipe.vae).__name__, **dict(pipe.vae.config)}}
        if pipe.text_encoder is not None:
            components["text_encoder"] = pipe.text_encoder.config.to_dict()
            components["text_encoder"]["architectures"] = [type(pipe.text_encoder).__name__]
        self.arch = self.name if self.shape else reference_name(config, "diffusion")
        size = self.settings.image_size
        self.image = (size, size) if size else pipe.default_size
        self.analysis = inspector.analyse(
            inspector.ModelConfig(self.model_name, "diffusion", jsonable(config), jsonable(components)),
            device=self.results.ceilings, dtype=dtype_name(pipe.dtype), image_size=self.image,
        )
        self.weights_bytes = tensor_bytes(pipe.denoiser)
        predicted_all = self.analysis.weight_bytes[self.analysis.dtype] + sum(self.analysis.component_bytes.values())
        self.results.models.append({
            "lane": "diffusion", "name": self.model_name, "source": "shape" if self.shape else "pretrained",
            "arch": self.arch, "dtype": self.analysis.dtype, "parameters": pipe.denoiser.num_parameters(),
            "weights_bytes": self.weights_bytes, "pipeline_bytes_loaded": delta.bytes, "config": jsonable(config),
        })
        add, name = self.results.add, self.model_name
        add("inspector", table_row("inspector", model=name, quantity="denoiser parameters", unit="count",
                                   predicted=self.analysis.parameters, measured=pipe.denoiser.num_parameters(),
                                   error=relative_error(self.analysis.parameters, pipe.denoiser.num_parameters()),
                                   method="num_parameters() of the loaded denoiser"))
        add("inspector", table_row("inspector", model=name, quantity="pipeline weights (denoiser, VAE, text encoder)",
                                   unit="bytes", predicted=predicted_all, measured=delta.bytes,
                                   error=relative_error(predicted_all, delta.bytes),
                                   method=("allocated by loading (torch.cuda.memory_allocated after - before)"
                                           if self.device.type == "cuda" else "process RSS after loading - before")))

    def free(self):
        self.pipe = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base(self, v: dict | None = None, path: str = "studio") -> dict:
        v = v or {}
        dtype = self.pipe.dtype if self.pipe is not None else None
        image = getattr(self, "image", None)
        return dict(model=self.model_name, arch=getattr(self, "arch", None), path=path,
                    attention=v.get("attention", "sdpa (AttnProcessor2_0)" if path != "studio" else None),
                    precision=v.get("precision") or "native", dtype=dtype_name(dtype) if dtype else None,
                    fast_path=v.get("fast_path", "off"), cfg=v.get("cfg", "batched"), preview=v.get("preview") or "none",
                    adapter=v.get("adapter") or "none", image=f"{image[0]}x{image[1]}" if image else None,
                    steps=self.settings.steps)

    def _prompts(self) -> list[str]:
        prompts = _CLASS_PROMPTS if self.pipe.conditioning == "class" else _IMAGE_PROMPTS
        if self.pipe.conditioning == "class":
            null = self.pipe.denoiser.config.num_embeds_ada_norm
            prompts = [str(int(p) % null) for p in prompts]
        return prompts

    def row(self, v: dict):
        base = self._base(v)
        if self.pipe is None:
            return self.results.add("diffusion", table_row("diffusion", status="skipped",
                                                           reason=f"the model did not load: {self.error}", **base))
        if v.get("skip"):
            return self.results.add("diffusion", table_row("diffusion", status="skipped", reason=v["skip"], **base))
        return or_failed(self.results, "diffusion", base, self._row, v, base)

    def _row(self, v: dict, base: dict) -> dict:
        s, pipe = self.settings, self.pipe
        if v["attention"] == "tiled":
            pairs = max(self._attention_pairs(), default=0)
            if pairs > TILED_MAX_BLOCK_PAIRS:
                return self.results.add("diffusion", table_row("diffusion", status="skipped", reason=(
                    f"the tiled kernel is a Python loop over 64x64 blocks: {pairs:,} block pairs in the largest "
                    "attention call; see the attention table for it"), **base))
        kwargs = dict(steps=s.steps, guidance_scale=1.0 if v["cfg"] == "off" else 5.0,
                      cfg_mode="batched" if v["cfg"] == "off" else v["cfg"], preview=v["preview"],
                      height=self.image[0], width=self.image[1])
        prompts = self._prompts()
        compile_s = self._lay_out(v["fast_path"])
        adapter = self._adapter() if v["adapter"] else None
        if v["adapter"] == "unmerged":
            kwargs["adapter"] = adapter.name
        # a scope, not the shared pipeline's defaults: the variant holds for these runs only; a
        # merged adapter is folded into the weights for the row and taken out exactly after it
        folded = merged(pipe.adapter_components(), adapter) if v["adapter"] == "merged" else contextlib.nullcontext()
        with backends.use(attention=v["attention"], precision=v["precision"]), folded:
            started = perf_counter()
            self._imagine(prompts[0], 0, kwargs)  # warm-up: FLOP counting and one-off set-up
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(self.device) as memory:
                runs, off = [], []
                for i in range(s.image_repeats):
                    prompt = prompts[(i + 1) % len(prompts)]
                    if v.get("paired"):
                        off.append(self._imagine(prompt, i + 1, dict(kwargs, **v["paired"])))
                    runs.append(self._imagine(prompt, i + 1, kwargs))
        steps_ms = [ms for r in runs for ms in r["step_ms"]]
        step_ms, step_min, step_max = median_spread(steps_ms)
        flops = runs[0]["step_flops"]
        vae_ms = statistics.median(r["vae_ms"] for r in runs)
        dtype = peak_key(v["precision"], pipe.dtype)
        row = self.results.add("diffusion", table_row(
            "diffusion", status="ok", repeats=len(runs), warmup_ms=warmup_ms, compile_s=compile_s, step_ms=step_ms,
            step_ms_min=step_min, step_ms_max=step_max, it_s=1e3 / step_ms, tflop_s=flops / step_ms / 1e9,
            share_of_peak=flops / (step_ms / 1e3) / matmul_peak(self.results.ceilings, dtype), vae_decode_ms=vae_ms,
            vae_tflop_s=runs[0]["vae_flops"] / vae_ms / 1e9 if vae_ms else None,
            image_ms=statistics.median(r["image_ms"] for r in runs), paired_overhead=paired_overhead(runs, off, "image_ms"),
            weights_bytes=self.weights_bytes, peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))
        if self.stock_step_ms and v["cfg"] == "batched":
            row["speedup_vs_stock"] = self.stock_step_ms / step_ms
        if v["row"] == "default":
            row["_cost"] = {"denoise step": (flops, runs[0]["step_bytes"]),
                            "vae decode": (runs[0]["vae_flops"], runs[0]["vae_bytes"])}
            self._inspect(row, flops)
        return row

    def _adapter(self):
        """A LoRA of rank 8 on the denoiser's attention projections with random weights, loaded into
        the pipeline once: what an adapter costs depends on its shape, not on what it learned."""
        if "bench" not in self.pipe.adapters:
            components = {k: v for k, v in self.pipe.adapter_components().items() if k != "text_encoder"}
            self.pipe.adapters["bench"] = random_adapter("bench", components, ("to_q", "to_k", "to_v", "to_out.0"))
        return self.pipe.adapters["bench"]

    def _attention_pairs(self) -> list[int]:
        shape = self.analysis.attention_scores_shape
        if not shape:
            return []
        return [math.ceil(shape[2] / 64) * math.ceil(shape[3] / 64)]

    def _imagine(self, prompt: str, seed: int, kwargs: dict) -> dict:
        started = perf_counter()
        events = list(self.pipe.stream(prompt, seed=seed, **kwargs))
        synchronize(self.device)
        total = perf_counter() - started
        denoise = [e for e in events if e.phase == "denoise"]
        decode = next(e for e in events if e.phase == "decode")
        timed = [e for e in denoise if not e.warmup] or denoise  # the first step holds one-off set-up
        return {"step_ms": [e.ms for e in timed], "step_flops": denoise[-1].flops, "step_bytes": denoise[-1].bytes,
                "vae_ms": decode.parts["vae"].ms, "vae_flops": decode.flops, "vae_bytes": decode.bytes,
                "image_ms": total * 1e3}

    def _inspect(self, row: dict, step_flops: int):
        a, add, name, device = self.analysis, self.results.add, self.model_name, self.results.ceilings.name
        step = a.predicted(device, "denoise step").ms
        add("inspector", table_row("inspector", model=name, quantity="denoise step time (CFG)", unit="ms", predicted=step,
                                   measured=row["step_ms"], error=relative_error(step, row["step_ms"]),
                                   method="roofline on this device's ceilings vs the denoise events' device time"))
        if any(w.name == "vae decode" for w in a.workloads):
            vae = a.predicted(device, "vae decode").ms
            add("inspector", table_row("inspector", model=name, quantity="VAE decode time", unit="ms", predicted=vae,
                                       measured=row["vae_decode_ms"], error=relative_error(vae, row["vae_decode_ms"]),
                                       method="roofline on this device's ceilings vs the decode event's VAE time"))
        add("inspector", table_row("inspector", model=name, quantity="denoise step FLOPs", unit="FLOP",
                                   predicted=a.workload("denoise step").flops, measured=step_flops,
                                   error=relative_error(a.workload("denoise step").flops, step_flops),
                                   method="FlopCounterMode on the meta device vs on the real run (the lane's events)"))

    def stock(self, compiled: bool):
        """The stock diffusers pipeline (StableDiffusionPipeline, DiTPipeline or PixArtAlphaPipeline)
        built from the same components as diffusers loaded them, with diffusers' own SDPA attention
        processors; compiled: its denoiser wrapped by torch.compile(mode="reduce-overhead"), as
        shared/ANCHORS.md measured it. Per step: the device time from the denoiser's start to the
        end of the scheduler's step (CUDA events recorded by hooks, no sync), or, compiled, from
        one step's end to the next; the VAE decode likewise."""
        base = self._base(path="stock diffusers compiled" if compiled else "stock diffusers")
        if self.pipe is None:
            return self.results.add("diffusion", table_row("diffusion", status="skipped",
                                                           reason=f"the model did not load: {self.error}", **base))
        return or_failed(self.results, "diffusion", base, self._stock, base, compiled)

    def _stock(self, base: dict, compiled: bool) -> dict:
        s, pipe = self.settings, self.pipe
        # compiled: a wrapper (the pipeline's own module stays as it is, for the lane's rows)
        denoiser = torch.compile(pipe.denoiser, mode="reduce-overhead") if compiled else pipe.denoiser
        try:
            stock, call = self._stock_pipeline(denoiser)
        except ValueError as error:
            return self.results.add("diffusion", table_row("diffusion", status="skipped", reason=str(error), **base))
        clock = _Marks(self.device)
        hooks = [] if compiled else [pipe.denoiser.register_forward_pre_hook(lambda *a: clock.mark("step"))]
        scheduler_step, vae_decode = stock.scheduler.step, pipe.vae.decode

        def step(*args, **kwargs):
            out = scheduler_step(*args, **kwargs)
            clock.mark("step end")
            return out

        def decode(*args, **kwargs):
            clock.mark("vae")
            out = vae_decode(*args, **kwargs)
            clock.mark("vae end")
            return out

        stock.scheduler.step, pipe.vae.decode = step, decode
        self._stock_attention()
        prompts = self._prompts()
        try:
            started = perf_counter()
            call(prompts[0], 0)
            synchronize(self.device)
            warmup_ms = (perf_counter() - started) * 1e3
            runs = []
            with PeakMemory(self.device) as memory:
                for i in range(s.image_repeats):
                    clock.clear()
                    started = perf_counter()
                    call(prompts[(i + 1) % len(prompts)], i + 1)
                    synchronize(self.device)
                    steps = clock.gaps("step end") if compiled else clock.spans("step", "step end")
                    runs.append(((perf_counter() - started) * 1e3, steps, clock.spans("vae", "vae end")))
        finally:
            for hook in hooks:
                hook.remove()
            del pipe.vae.decode  # the instance attribute; the class's method shows again
            self._studio_attention()
        steps_ms = [ms for _, spans, _ in runs for ms in spans[1:] or spans]  # the first step holds set-up
        step_ms, step_min, step_max = median_spread(steps_ms)
        vae_ms = statistics.median(spans[0] for _, _, spans in runs if spans)
        if not compiled:
            self.stock_step_ms = step_ms
        return self.results.add("diffusion", table_row(
            "diffusion", status="ok", repeats=len(runs), warmup_ms=warmup_ms, step_ms=step_ms, step_ms_min=step_min,
            step_ms_max=step_max, it_s=1e3 / step_ms, vae_decode_ms=vae_ms,
            image_ms=statistics.median(r[0] for r in runs), weights_bytes=self.weights_bytes,
            speedup_vs_stock=self.stock_step_ms / step_ms if self.stock_step_ms else None,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))

    def _stock_pipeline(self, denoiser):
        from diffusers import DiTPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

        s, pipe = self.settings, self.pipe
        scheduler = pipe.make_scheduler(None)
        height, width = self.image
        if pipe.is_unet:
            stock = StableDiffusionPipeline(
                vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=denoiser,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )

            def call(prompt, seed):
                return stock(prompt, num_inference_steps=s.steps, guidance_scale=5.0, height=height, width=width,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        elif pipe.conditioning == "class":
            if pipe.denoiser.config.num_embeds_ada_norm != 1000:
                raise ValueError("diffusers' DiTPipeline hard-codes the null class 1000 (ImageNet's); this model has "
                                 f"{pipe.denoiser.config.num_embeds_ada_norm} classes")
            stock = DiTPipeline(transformer=denoiser, vae=pipe.vae, scheduler=scheduler)

            def call(prompt, seed):
                return stock(class_labels=[int(prompt)], num_inference_steps=s.steps, guidance_scale=5.0,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        else:
            stock = PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                        transformer=denoiser, scheduler=scheduler)

            def call(prompt, seed):
                return stock(prompt, num_inference_steps=s.steps, guidance_scale=5.0, height=height, width=width,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                             use_resolution_binning=False, clean_caption=False)
        stock.set_progress_bar_config(disable=True)
        for model in (pipe.denoiser, pipe.text_encoder):
            if model is not None:
                backends.restore_precision(model)
        return stock, call

    def _stock_attention(self):
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        for model in (self.pipe.denoiser, self.pipe.vae):
            for module in model.modules():
                if isinstance(module, Attention):
                    module.set_processor(AttnProcessor2_0())
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder.set_attn_implementation("sdpa")

    def _studio_attention(self):
        from diffusers.models.attention_processor import Attention

        from studio.integrations import diffusers as studio_diffusers
        from studio.integrations import transformers as studio_transformers

        studio_diffusers.use_studio_attention(self.pipe.denoiser)
        if any(isinstance(m, Attention) for m in self.pipe.vae.modules()):
            studio_diffusers.use_studio_attention(self.pipe.vae)
        if self.pipe.text_encoder is not None:
            studio_transformers.use_studio_attention(self.pipe.text_encoder)


class _Marks:
    """Time stamps recorded from hooks: CUDA events queued on the stream (no sync), or perf_counter."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def mark(self, kind: str):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((kind, event))
        else:
            self.marks.append((kind, perf_counter()))

    def clear(self):
        self.marks = []

    def gaps(self, kind: str) -> list[float]:
        """Milliseconds between consecutive marks of `kind`."""
        stamps = [stamp for k, stamp in self.marks if k == kind]
        if self.device.type == "cuda":
            for stamp in stamps:
                stamp.synchronize()
            return [a.elapsed_time(b) for a, b in zip(stamps, stamps[1:])]
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]

    def spans(self, start: str, end: str) -> list[float]:
        """Milliseconds from each `start` mark to the next `end` mark."""
        spans, opened = [], None
        for kind, stamp in self.marks:
            if kind == start and opened is None:
                opened = stamp
            elif kind == end and opened is not None:
                if self.device.type == "cuda":
                    stamp.synchronize()
                    spans.append(opened.elapsed_time(stamp))
                else:
                    spans.append((stamp - opened) * 1e3)
                opened = None
        return spans
