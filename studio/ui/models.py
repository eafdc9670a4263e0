"""The app's models: which it offers (the shipped ones, the operator's, a remote server), each
loaded once and shared by every session, with its fast path compiled in the background.

Depends on gradio (its errors), the pipelines and the studio core.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from pipelines import LatentDiffusionPipeline, TextGenerationPipeline
from pipelines.fast_decode import FastDecoder, wants_fast_path
from pipelines.fast_diffusion import enable_fast_path
from pipelines.fast_llama import MIN_CACHE_LENGTH
from pipelines.remote import remote_from_env
from studio import assets, backends

log = logging.getLogger(__name__)

REMOTE = "remote (STUDIO_REMOTE_LLM)"


class Models:
    """The allow-listed models the app may load, each loaded once per device on first use.

    The hosted app never loads a name typed into the browser: only the shipped models (the
    default first, see assets.default_model) and those the operator adds with STUDIO_MODELS
    (hub ids or local folders, see assets.operator_models). Likewise each model's LoRA adapters:
    the shipped ones made for it and those the operator adds for it with STUDIO_ADAPTERS (local
    folders, see assets.operator_adapters), each loaded once into the model's pipeline.
    """

    def __init__(self, llm_names: list[str] | None = None, diffusion_names: list[str] | None = None, remote=None,
                 adapters: dict[str, list[str]] | None = None):
        extra = assets.operator_models() if llm_names is None or diffusion_names is None else {}
        self.llm_names = llm_names if llm_names is not None else allow_list("llm", extra)
        self.diffusion_names = diffusion_names if diffusion_names is not None else allow_list("diffusion", extra)
        self.operator_adapters = assets.operator_adapters() if adapters is None else adapters
        for base in self.operator_adapters:
            if base not in self.llm_names + self.diffusion_names:
                raise ValueError(f"STUDIO_ADAPTERS: {base!r} is not one of this app's models "
                                 f"({', '.join(self.llm_names + self.diffusion_names) or 'none'}); name the base model "
                                 "as the model list names it")
        # an OpenAI-compatible server the operator configured (STUDIO_REMOTE_LLM), shown as one more LLM
        self.remote = remote if remote is not None else remote_from_env()
        if self.remote is not None:
            self.llm_names = self.llm_names + [REMOTE]
        self._loaded: dict[tuple[str, str, str], object] = {}
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self.warming: threading.Thread | None = None  # the warm-up's thread, while it loads
        # the models' background compiles wait for this: cleared while `studio compile` fills the on-disk cache
        self.cache_filled = threading.Event()
        self.cache_filled.set()

    def llm(self, name: str, device: str) -> TextGenerationPipeline:
        if name == REMOTE and self.remote is not None:
            return self.remote
        return self._get("llm", name, device, self.llm_names, load_llm)

    def diffusion(self, name: str, device: str) -> LatentDiffusionPipeline:
        return self._get("diffusion", name, device, self.diffusion_names, load_diffusion)

    def _get(self, kind, name, device, allowed, load):
        if name not in allowed:
            raise gr.Error(f"{name!r} is not one of this app's {kind} models: {', '.join(allowed) or 'none'}")
        key = (kind, name, device)
        with self._lock:  # one lock per model: a slow load (a download) holds up only its own lane
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._loaded:
                model = load(name, device=device)
                if getattr(model, "fast_decoder", None) is not None:
                    model.fast_decoder.compile_after = self.cache_filled
                if getattr(model, "fast_path_report", None) is not None:
                    model.fast_path_report.compile_after = self.cache_filled
                self._loaded[key] = model
            return self._loaded[key]

    def adapter_names(self, kind: str, name: str) -> list[str]:
        """The LoRA adapters offered with one of the lane's models: shipped, then the operator's."""
        return adapter_allow_list(kind, name, self.operator_adapters)

    def with_adapter(self, kind: str, name: str, device: str, adapter: str) -> str:
        """Load an adapter offered with model `name` into its pipeline, once; the name to run it by
        (the adapter as the list names it)."""
        offered = self.adapter_names(kind, name)
        if adapter not in offered:
            raise gr.Error(f"{adapter!r} is not one of the adapters offered with {name}: "
                           f"{', '.join(offered) or 'none'}")
        pipeline = self.llm(name, device) if kind == "llm" else self.diffusion(name, device)
        with self._locks[(kind, name, device)]:  # the model's own lock: loading it set that up
            if adapter not in pipeline.adapters:
                pipeline.load_adapter(adapter, name=adapter)
        return adapter

    def warm_up(self, device: str, cache_first: bool = True) -> threading.Thread | None:
        """Load the default models and compile their fast paths in the background, so that the
        compiles are off the first requests' path: the LLM's decode step for a short request
        (batch 1, the smallest cache); on the CPU, the diffusion model's denoiser and VAE decoder
        for the app's default settings (one two-step image starts those compiles).

        A compile in this process slows the requests running meanwhile about tenfold (the tracer
        and the requests share one interpreter), so on the CPU, with cache_first, `studio compile`
        first compiles the same in a low-priority subprocess into inductor's on-disk cache; the
        compile here then takes seconds instead of a minute, and requests run at full speed while
        the subprocess works."""
        llm_name = next((n for n in self.llm_names if n != REMOTE), None)
        diffusion_name = self.diffusion_names[0] if self.diffusion_names else None
        if llm_name is None and diffusion_name is None:
            return None

        cache_first = cache_first and torch.device(device).type == "cpu"
        if cache_first:
            self.cache_filled.clear()  # requests run eagerly, and compile nothing here, until it is filled

        def warm():
            try:  # the compiles started here wait for cache_filled in their own threads
                llm = self.llm(llm_name, device) if llm_name else None
                if llm is not None and llm.fast_decoder is not None:
                    llm.fast_decoder.warm_up(batch=1, max_len=MIN_CACHE_LENGTH, background=True)
                pipe = self.diffusion(diffusion_name, device) if diffusion_name else None
                if pipe is not None and pipe.fast_path_report is not None and pipe.fast_path_report.background:
                    with backends.use(attention="auto"):  # as the app's default choice: the shapes and kernel it compiles for
                        pipe("", steps=2)
            except Exception as error:  # the first request loads it again and says what is wrong
                log.warning("warming up the default models failed: %s", error)
            finally:
                if cache_first:
                    try:
                        compile_in_subprocess(llm_name, diffusion_name, device)
                    finally:
                        self.cache_filled.set()

        self.warming = threading.Thread(target=warm, daemon=True, name="warm up")
        self.warming.start()
        return self.warming

    def wait_for_compiles(self, timeout: float = 600) -> None:
        """Wait until no loaded model is compiling in the background (before the process exits: a
        compile cut short at exit aborts the interpreter)."""
        if self.warming is not None:
            self.warming.join(timeout)
        deadline = time.monotonic() + timeout

        def compiling(kind, model):
            if kind == "llm":
                return getattr(model, "fast_decoder", None) is not None and model.fast_decoder.compiling
            return model.fast_path_report is not None and bool(model.fast_path_report.compiling)

        for (kind, *_), model in list(self._loaded.items()):
            while compiling(kind, model):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.5)


def load_llm(name: str, device: str) -> TextGenerationPipeline:
    """An LLM as the app runs it: where the fast path can run it, its decode step compiles in a
    background thread (compile="background") while requests run it eagerly. Set up before the
    model is handed to any request, so a request never builds a decoder of its own meanwhile."""
    llm = TextGenerationPipeline.from_pretrained(name, device=device)
    if wants_fast_path(llm, None, use_cache=True, speculative=None):
        llm.fast_decoder = FastDecoder(llm.model, backends.precision_of(llm.model), compile="background")
    return llm


def compile_in_subprocess(llm_name: str | None, diffusion_name: str | None, device: str) -> None:
    """Run `studio compile` for these models and wait for it; a failure is logged, not raised
    (the compile in this process then simply takes longer)."""
    command = [sys.executable, "-m", "studio.cli", "compile", "--device", device]
    command += ["--llm", llm_name] if llm_name else []
    command += ["--diffusion", diffusion_name] if diffusion_name else []
    # run from the folder holding the studio package, so that `-m studio.cli` finds it however the app was started
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        log.warning("compiling the fast paths in a subprocess failed (%s); compiling them here",
                    lines[-1] if lines else f"exit status {done.returncode}")


def load_diffusion(name: str, device: str) -> LatentDiffusionPipeline:
    """A diffusion model as the app runs it: on the CPU on the fast path, each new input shape of
    its denoiser and VAE decoder compiled in a background thread while requests run them eagerly
    (on CUDA the fast path is on anyway, uncompiled: compiling there is not yet measured)."""
    pipe = LatentDiffusionPipeline.from_pretrained(name, device=device)
    if pipe.device.type == "cpu":
        enable_fast_path(pipe, compile="background")
    return pipe


def allow_list(kind: str, extra: dict[str, list[str]]) -> list[str]:
    """A lane's models: the default first, the other shipped ones, then the operator's."""
    default = assets.default_model(kind)
    shipped = ([default] if default else []) + [n for n in assets.list_models(kind) if n != default]
    return shipped + [n for n in extra.get(kind, []) if n not in shipped]


def adapter_allow_list(kind: str, model: str, extra: dict[str, list[str]], manifest=None) -> list[str]:
    """A model's LoRA adapters: the shipped ones whose base it is, then the operator's for it."""
    shipped = assets.load_manifest(manifest)
    return [name for name, entry in shipped.items() if entry.kind == f"{kind}-adapter" and entry.base == model] + [
        folder for folder in extra.get(model, []) if folder not in shipped]
