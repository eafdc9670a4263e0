"""`run_suite`: the plan of a `studio bench` run (the attention table, then each LLM, then each
diffusion model), run workload by workload, one broken workload never stopping the others; then
the side-by-side table and the goals.

The top of the bench: it imports the lanes, the goals and the results; nothing in the bench imports
it but the package's __init__. Never imports the report or the UI.
"""

from __future__ import annotations

import sys
import traceback
from time import perf_counter

import torch

from studio.bench.attention import AttentionBench
from studio.bench.diffusion import DiffusionBench
from studio.bench.goals import evaluate_goals, side_by_side
from studio.bench.llm import LLMBench
from studio.bench.results import Results, Settings, first_line
from studio.profiling import ceilings_for


def _quiet():
    """Silence the libraries' progress bars and advice while benchmarking."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*invalid value encountered.*")


def run_suite(settings: Settings, progress: bool = True, verbose: bool = False, after_task=None) -> Results:
    """Run every workload the settings ask for and return the results. after_task(results), if
    given, is called after every workload: `studio bench` writes bench.json there, so that a run
    cut off keeps what it measured."""
    from tqdm import tqdm

    _quiet()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = Results(settings)
    device = results.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    results.ceilings = ceilings_for(device)
    results.meta["torch_threads"] = torch.get_num_threads()

    plan: list[tuple[str, object]] = []
    if "attention" in settings.lanes:
        plan += AttentionBench(settings, results).tasks()
    if "llm" in settings.lanes:
        for name in settings.llm_models:
            plan += LLMBench(settings, results, name, shape=False).tasks()
        for name in settings.llm_shapes:
            plan += LLMBench(settings, results, name, shape=True).tasks()
    if "diffusion" in settings.lanes:
        for name in settings.diffusion_models:
            plan += DiffusionBench(settings, results, name, shape=False).tasks()
        for name in settings.diffusion_shapes:
            plan += DiffusionBench(settings, results, name, shape=True).tasks()

    bar = tqdm(total=len(plan), desc="studio bench", unit="workload", file=sys.stderr, disable=not progress)
    results.meta["task_s"] = {}
    for label, task in plan:
        bar.set_postfix_str(label[:60])
        started = perf_counter()
        try:
            task()
        except Exception as error:  # a workload that breaks is reported, and the suite goes on
            if verbose:
                traceback.print_exc()
            print(f"studio bench: {label}: {first_line(error)}", file=sys.stderr)
        results.meta["task_s"][label] = round(perf_counter() - started, 2)
        if after_task is not None:
            after_task(results)
        bar.update()
    bar.close()
    side_by_side(results)
    evaluate_goals(results)
    return results
