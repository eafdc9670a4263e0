"""The `studio` command: the same lanes and measurements as the app, from a terminal.

Depends on the studio core, on the pipelines for `generate` and `imagine`, and on the UI only for `serve`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from studio import assets

# what `studio train` and `studio evaluate` know: the shipped diffusion models and adapters
TRAINABLE = ["emoji-sd", "fashion-dit", "emoji-describer", "symbola-outline"]


def cmd_backends(args) -> int:
    from studio import backends

    device = torch.device(args.device) if args.device else backends.default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    infos = backends.available(device, dtype)
    sources = backends.installed_plugins()
    width = max(len(name) for name in [b.name for b in infos] + [s.name for s in sources])
    for b in infos:
        status = "yes" if b.available else f"no: {b.reason}"
        print(f"{b.kind:<9} {b.name:<{width}}  {status}")
    for s in sources:  # installed plugin packages: what each registered, or why it failed to load
        status = f"FAILED to load: {s.error}" if s.error else f"loaded: {', '.join(s.backends) or 'registered nothing'}"
        print(f"{'plugin':<9} {s.name:<{width}}  {status} ({s.distribution or s.value})")
    weights, reason = backends.cpu_weight_format(device)
    print(f"\nthe LLM fast path's weights here: {weights or 'the model’s own dtype'} ({reason})")
    return 0


def cmd_generate(args) -> int:
    from transformers.utils import logging as transformers_logging

    from pipelines.text_generation import TextGenerationPipeline

    transformers_logging.disable_progress_bar()  # the tokens are the progress here

    llm = TextGenerationPipeline.from_pretrained(
        args.model, device=args.device, attention=args.attention, precision=args.precision
    )
    adapter = llm.load_adapter(args.adapter) if args.adapter else None
    speculative = {"none": None}.get(args.speculative, args.speculative)
    draft = None
    if speculative == "draft":
        draft = TextGenerationPipeline.from_pretrained(args.draft, device=args.device)
    elif speculative == "self" and args.draft:
        draft = int(args.draft)
    events = llm.stream(
        args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache, chat=args.chat, stop=args.stop,
        top_logprobs=args.show_probs, speculative=speculative, draft=draft, adapter=adapter,
    )
    decode_ms, tokens = [], 0
    for ev in events:
        if ev.notice:  # e.g. the fast path fell back: said once, on the terminal's error stream
            print(f"\n[{ev.notice}]", file=sys.stderr)
        if ev.phase == "tokenize":
            print(f"[{len(ev.token_ids)} prompt tokens]", file=sys.stderr)
            print(args.prompt, end="", flush=True)
            continue
        tokens += 1
        if ev.phase == "decode" and ev.timing is not None:
            decode_ms.append(ev.ms)
        if args.show_probs:
            alternatives = "  ".join(f"{text!r} {prob:.1%}" for text, _, prob in ev.top)
            print(f"\n  {ev.phase} {ev.index}: {ev.text!r} (p={math.exp(ev.logprob):.1%}) | {alternatives}", end="")
        else:
            print(ev.text, end="", flush=True)
    print()
    if decode_ms:
        print(f"[{tokens} tokens; decode {1000 * (tokens - 1) / sum(decode_ms):.1f} tok/s on {llm.device}]", file=sys.stderr)
    return 0


def cmd_imagine(args) -> int:
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from tqdm import tqdm

    from pipelines.latent_diffusion import LatentDiffusionPipeline

    diffusers_logging.disable_progress_bar()  # our own bar counts the denoising steps

    pipe = LatentDiffusionPipeline.from_pretrained(
        args.model, device=args.device, attention=args.attention, precision=args.precision
    )
    image = Image.open(args.image).convert("RGB") if args.image else None
    events = pipe.stream(
        args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        height=args.height, width=args.width, scheduler=args.scheduler, cfg_mode=args.cfg_mode, image=image,
        strength=args.strength, preview=None, adapter=pipe.load_adapter(args.adapter) if args.adapter else None,
        adapter_scale=args.adapter_scale,
    )
    bar, run_ms, model_ms = None, 0.0, {}
    for ev in events:
        if ev.notice:  # e.g. a compiled model fell back to eager: said once
            print(f"[{ev.notice}]", file=sys.stderr)
        run_ms += ev.ms
        for name, timing in ev.parts.items():
            model_ms[name] = model_ms.get(name, 0.0) + timing.ms
        if ev.phase == "denoise":
            bar = bar or tqdm(total=ev.total, desc="denoising", unit="step", file=sys.stderr)
            bar.set_postfix_str(f"t={ev.timestep:g} {ev.ms:.0f} ms, {ev.forward_passes} forward passes")
            bar.update()
        elif ev.phase == "decode":
            if bar is not None:
                bar.close()
            ev.image.save(args.output)
            shares = ", ".join(f"{name} {ms / run_ms:.0%}" for name, ms in model_ms.items())
            print(f"wrote {args.output} ({ev.image.width}x{ev.image.height}): {ev.total} steps, "
                  f"{ev.forward_passes} denoiser forward passes, {run_ms:.0f} ms on {pipe.device} ({shares})",
                  file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from studio.loading import LoadError

    for model in assets.load_manifest().values():
        try:
            assets.verify(model)
            status = "ok"
        except LoadError as error:
            status = str(error)
        print(f"{model.name:<13} {model.kind:<9} {model.parameters / 1e6:7.1f}M  {model.architecture}\n"
              f"{'':<13} data: {model.training_data} ({model.training_data_license})\n{'':<13} files: {status}")
    return 0


def cmd_train(args) -> int:
    from transformers.utils import logging as transformers_logging

    from studio import train, train_adapters

    transformers_logging.disable_progress_bar()  # the steps are the progress here
    torch.set_num_threads(args.threads)
    if args.model in train_adapters.STEPS:
        train_adapters.train(args.model, out=args.out, steps=args.steps)
    else:
        train.train(args.model, out=args.out, resume=args.resume,
                    **{k: v for k, v in vars(args).items() if k.endswith("_steps")})
    return 0


def cmd_evaluate(args) -> int:
    from studio import train, train_adapters

    torch.set_num_threads(args.threads)
    (train_adapters if args.model in train_adapters.STEPS else train).evaluate(args.model, folder=args.folder)
    return 0


def cmd_bench(args) -> int:
    import json
    import time

    from studio import bench
    from studio import inspector

    llm_shapes, diffusion_shapes = [], []
    for name in args.shape or []:
        loaded = inspector.load_config(name)
        reference = inspector.find_reference(name)
        (llm_shapes if loaded.kind == "llm" else diffusion_shapes).append(reference.name if reference else name)
    lanes = tuple(lane.strip() for lane in args.lanes.split(",") if lane.strip())
    unknown = set(lanes) - {"llm", "diffusion", "attention"}
    if unknown:
        raise ValueError(f"unknown lane {', '.join(sorted(unknown))}; use llm, diffusion and/or attention")
    settings = bench.Settings.for_device(
        args.device, quick=args.quick, llm_models=args.llm or [], llm_shapes=llm_shapes,
        diffusion_models=args.diffusion or [], diffusion_shapes=diffusion_shapes, lanes=lanes, draft=args.draft,
        repeats=args.repeats, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        prefill_tokens=args.prefill_tokens, steps=args.steps, image_size=args.image_size,
        attention_seq=args.attention_seq, threads=args.threads, image_repeats=args.image_repeats,
        attention_kernels=tuple(args.attention.split(",")) if args.attention else None,
        precisions=tuple(args.precision.split(",")) if args.precision else None,
        llm_rows=tuple(args.llm_rows.split(",")) if args.llm_rows else None,
        diffusion_rows=tuple(args.diffusion_rows.split(",")) if args.diffusion_rows else None,
    )
    started = time.perf_counter()
    out = Path(args.out or f"results/{time.strftime('%Y%m%d-%H%M%S')}-{settings.device}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)

    def so_far(results):  # bench.json after every workload: a run cut off keeps what it measured
        (out / "bench.json").write_text(json.dumps(results.to_json(), indent=1, default=str))

    results = bench.run_suite(settings, progress=not args.no_progress, after_task=so_far)
    results.meta["command"] = "studio " + " ".join(args.argv)
    results.meta["wall_s"] = round(time.perf_counter() - started, 1)
    paths = bench.write_results(results, out)
    data = results.to_json()
    # the comparison the inspector's predictions owe, and the goals, on the terminal
    report = bench.markdown(data)
    for section in ("## Predicted", "## Goals"):
        if section in report:
            print(report[report.index(section):].split("\n## ")[0].rstrip() + "\n")
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({results.meta['wall_s']} s)", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    import json
    from pathlib import Path

    from studio import inspector

    if args.list:
        for name, folder in inspector.reference_configs(tiny=True).items():
            print(f"{name:<16} {folder}")
        return 0
    if not args.config:
        raise ValueError("give a config: a reference name (see --list), a config.json, a folder or a hub id")
    from studio import adapters

    if args.base or adapters.is_adapter(args.config):
        print(adapters.format_adapter(adapters.inspect_adapter(args.config, base=args.base)))
        return 0
    analysis = inspector.analyse(
        args.config, device=args.device, dtype=args.dtype, prompt_tokens=args.prompt_tokens, image_size=args.image_size
    )
    print(inspector.format_analysis(analysis))
    # where a benchmark measured this model, its measurements next to the predictions
    from studio import bench

    candidates = [Path(args.results)] if args.results else sorted(
        list(Path("results").glob("*/bench.json")) + list(Path("docs/benchmarks").glob("**/*.json")),
        key=lambda p: p.stat().st_mtime, reverse=True,
    )
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            if args.results:
                raise ValueError(f"cannot read the results {path}: {error}") from error
            continue
        if args.results or bench.measured_for(data, analysis.name):
            print(f"\nmeasured ({path}):")
            print(bench.format_measured(data, analysis.name))
            break
    return 0


def cmd_serve(args) -> int:
    if not (args.api or args.api_only):
        from studio.ui import build_app

        build_app().queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port or 7860)
        return 0

    import uvicorn

    from studio.server import DEFAULT_MODEL, create_api, loader

    # the API's models load on their first request, so the server is up at once
    models = args.model or [DEFAULT_MODEL]
    adapters = {}
    for spec in args.adapter or []:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise ValueError(f"--adapter takes name=path (a LoRA folder or a shipped adapter's name); got {spec!r}")
        adapters[name] = (models[0], path)
    app = create_api({name: loader(name) for name in models}, adapters)
    if not args.api_only:
        import gradio as gr

        from studio.ui import build_app

        # the API's /v1 routes come first; everything else is the app
        app = gr.mount_gradio_app(app, build_app().queue(default_concurrency_limit=2), path="/")
    uvicorn.run(app, host=args.host, port=args.port or (8000 if args.api_only else 7860))
    return 0


def cmd_compile(args) -> int:
    import os

    from transformers.utils import logging as transformers_logging

    from studio.ui import Models

    transformers_logging.disable_progress_bar()

    # what the app runs at its start, in this process: compiled here, the code lands in inductor's
    # on-disk cache, and the app's own compile then takes seconds; at low priority, so that the
    # app's requests keep the CPU
    if hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    started = time.perf_counter()
    models = Models(llm_names=[args.llm] if args.llm else [], diffusion_names=[args.diffusion] if args.diffusion else [],
                    adapters={})
    if args.llm:  # loaded here first: a model that does not load is this command's error, not a warning
        models.llm(args.llm, args.device)
    if args.diffusion:
        models.diffusion(args.diffusion, args.device)
    models.warm_up(args.device, cache_first=False)
    models.wait_for_compiles()
    print(f"compiled the fast paths of {', '.join(filter(None, [args.llm, args.diffusion]))} on {args.device} "
          f"for the app's default settings in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every `studio` command and its options."""
    parser = argparse.ArgumentParser(prog="studio", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("backends", help="list the attention and precision backends and whether each runs here")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the device's usual dtype")
    p.set_defaults(run=cmd_backends)

    p = commands.add_parser("generate", help="continue a prompt with an LLM, printing tokens as they come")
    p.add_argument("prompt")
    p.add_argument("--model", default=assets.default_model("llm"),
                   help="a shipped name, a local folder, a .gguf file or a hub id (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (the staircase)")
    p.add_argument("--show-probs", type=int, nargs="?", const=5, default=0, metavar="N",
                   help="print each token's top-N alternatives (default N: 5)")
    p.add_argument("--adapter", help="a LoRA adapter to run with: a shipped adapter's name or a peft folder")
    p.add_argument("--speculative", choices=["none", "draft", "prompt-lookup", "self"], default="none")
    p.add_argument("--draft", help="draft model (speculative=draft) or number of layers (speculative=self)")
    p.add_argument("--device")
    p.add_argument("--attention", help="attention backend (see `studio backends`)")
    p.add_argument("--precision", help="matmul precision (see `studio backends`)")
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("imagine", help="paint an image from a prompt with a diffusion model, step by step")
    p.add_argument("prompt", help="what to paint (for a class-conditioned model: a class name; empty: unconditional)")
    p.add_argument("-o", "--output", default="image.png", help="where to write the PNG")
    p.add_argument("--model", default=assets.default_model("diffusion"),
                   help="a shipped name, a local diffusers folder or a hub id (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; 1 turns it off")
    p.add_argument("--negative", help="negative prompt (default: empty)")
    p.add_argument("--scheduler", help="ddim, euler, euler-ancestral, dpm-solver++ or pndm (default: the model's)")
    p.add_argument("--cfg-mode", choices=["batched", "sequential"], default="batched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--image", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the schedule to run")
    p.add_argument("--adapter", help="a LoRA adapter to run with: a shipped adapter's name or a diffusers LoRA folder")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="the adapter's weight (default 1.0)")
    p.add_argument("--device")
    p.add_argument("--attention", help="attention backend (see `studio backends`)")
    p.add_argument("--precision", help="matmul precision (see `studio backends`)")
    p.set_defaults(run=cmd_imagine)

    p = commands.add_parser("models", help="list the shipped models and check their files")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("train", help="train a shipped diffusion model or adapter into assets/ (see docs/models.md)")
    p.add_argument("model", choices=TRAINABLE)
    p.add_argument("--out", type=Path, help="the folder to write (default: assets/MODEL, recorded in assets/manifest.json)")
    p.add_argument("--vae-steps", type=int, help="default: the shipped model's")
    p.add_argument("--unet-steps", type=int, help="emoji-sd; default: the shipped model's")
    p.add_argument("--dit-steps", type=int, help="fashion-dit; default: the shipped model's")
    p.add_argument("--steps", type=int, help="an adapter's training steps; default: the shipped adapter's")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (or train on for more steps)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one makes a run repeatable)")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("evaluate", help="measure a shipped diffusion model or adapter; writes docs/models/MODEL-*")
    p.add_argument("model", choices=TRAINABLE)
    p.add_argument("--folder", type=Path, help="a trained folder (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("bench", help="benchmark both lanes side by side; JSON, CSV, markdown and plots")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a CPU smoke run: minutes)")
    p.add_argument("--llm", action="append", metavar="MODEL",
                   help="an LLM: shipped name, folder or hub id (repeatable; default: smollm2-135m)")
    p.add_argument("--diffusion", action="append", metavar="MODEL",
                   help="a diffusion model: shipped name, folder or hub id (repeatable; default: fashion-dit)")
    p.add_argument("--shape", action="append", metavar="NAME",
                   help="a reference architecture with random weights, e.g. llama-3.2-1b, smollm2-135m, sd-1.5-unet, "
                        "dit-xl-2-256, tiny-llama, tiny-sd (repeatable; see `studio inspect --list`)")
    p.add_argument("--out", help="results folder (default: results/DATE-DEVICE)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--lanes", default="llm,diffusion,attention", help="which tables to run (comma-separated)")
    p.add_argument("--attention", help="only these attention kernels (comma-separated), besides auto")
    p.add_argument("--draft", help="draft model for the speculative=draft row")
    p.add_argument("--repeats", type=int, help="timed repeats per workload")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--prefill-tokens", type=int)
    p.add_argument("--steps", type=int, help="denoising steps per image")
    p.add_argument("--image-size", type=int)
    p.add_argument("--attention-seq", type=int, help="sequence length of the attention kernels table")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--precision", help="only these precisions (comma-separated), besides the model's own")
    p.add_argument("--image-repeats", type=int, help="timed images per diffusion row")
    p.add_argument("--llm-rows", help="only these kinds of LLM rows (comma-separated; 'none' for none): "
                   "default, kernels, precisions, no-cache, speculative, events, fast, fast-events, fast-own-dtype, "
                   "fast-int8, adapter, generate, generate-static, llama.cpp, prefill, first-token, agreement")
    p.add_argument("--diffusion-rows", help="only these kinds of diffusion rows (comma-separated; 'none' for none): "
                   "stock, stock-compiled, plain, default, kernels, precisions, sequential, cfg-off, previews, "
                   "compiled, adapter")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("inspect", help="what a config.json predicts: parameters, memory, bound and time per device")
    p.add_argument("config", nargs="?", help="a reference name (--list), a config.json or model folder, a shipped "
                   "model or a hub id; or a LoRA adapter (shipped, or a folder with --base)")
    p.add_argument("--device", help="a known GPU or part of its name (h100, a100 ...), or cpu/cuda to probe this machine")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8", "fp8"], help="default: bf16 (LLM), fp16 (diffusion)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length; decode is the token after it")
    p.add_argument("--image-size", type=int, help="diffusion: pixels per side (default: the model's own)")
    p.add_argument("--results", help="a bench.json to compare with (default: the newest under results/ or docs/benchmarks/)")
    p.add_argument("--list", action="store_true", help="list the shipped reference configs")
    p.add_argument("--base", help="an adapter's base model, where the adapter does not name it (a shipped adapter does)")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser("compile", help="compile the app's default models' fast paths into torch's on-disk "
                            "cache (the app does this at start; run it ahead, e.g. in a Space's build)")
    p.add_argument("--llm", default=assets.default_model("llm"), help="default: %(default)s")
    p.add_argument("--diffusion", default=assets.default_model("diffusion"), help="default: %(default)s")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_compile)

    p = commands.add_parser("serve", help="launch the Gradio app, the OpenAI-compatible API, or both")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="default: 7860, or 8000 with --api-only")
    p.add_argument("--api", action="store_true", help="also serve /v1/completions, /v1/chat/completions and /v1/models")
    p.add_argument("--api-only", action="store_true", help="serve the API without the app")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="serve a LoRA adapter of the first --model as a model named NAME (repeatable), as vLLM's "
                        "--lora-modules do; PATH: a peft folder or a shipped adapter's name")
    p.add_argument("--model", action="append", help="a model the API serves, by the name it is loaded with "
                   "(repeatable; default: smollm2-135m)")
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input, unknown backends, models that do not load: say what, no traceback
        print(f"studio {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
