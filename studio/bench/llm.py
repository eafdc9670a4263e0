"""The LLM rows of `studio bench`: the LLM lane per attention kernel, precision, KV cache on/off, fast
path (compiled, its weights in the device's default format, in the model's own dtype, int8) and
speculative mode (and per-token alternatives on/off), next to transformers' generate() and
llama.cpp on the same model, prompts, length and threads. Its tasks also fill the prefill table
(studio.bench.prefill) and the precision-agreement table (studio.bench.agreement), and what the
inspector predicted for the model against what was measured.

Depends on torch, studio.backends, studio.cost, studio.inspector and studio.bench.measure /
.shapes / .results / .agreement / .prefill (which take this bench as an argument, and never import
it); imports the LLM pipeline, transformers and studio.bench.llamacpp inside its functions, as a
consumer of the lanes. Never imports another lane of the bench, the goals, the report or the UI.
"""

from __future__ import annotations

import contextlib
import gc
import random
import statistics
from time import perf_counter

import torch

from studio import backends, inspector
from studio.bench.agreement import PRECISIONS, agreement_rows
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
from studio.bench.prefill import first_token_rows, prefill_rows
from studio.bench.results import (
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
    roofline_share,
    table_row,
    wants,
)
from studio.adapters import merged, random_adapter
from studio.bench.shapes import build_llm_shape, reference_name
from studio.cost import decoder_step_cost

_WORDS = (
    "the river carried small boats past old mills while children counted clouds above green hills and a baker "
    "opened his shop to sell warm bread to travellers who had walked all night through quiet villages near the sea"
).split()


class LLMBench:
    """One LLM: every lane variant, transformers' generate() and llama.cpp next to them, the long
    prefill and the precision agreement."""

    def __init__(self, settings: Settings, results: Results, name: str, shape: bool):
        self.settings, self.results, self.name, self.shape = settings, results, name, shape
        self.device = results.device
        self.llm = None
        self.error: str | None = None
        self.model_name = f"{name} (random weights)" if shape else name
        self.stock_tok_s: float | None = None

    # the plan: load, then one task per row, then free the model
    def tasks(self):
        s = self.settings
        tasks = [(f"load {self.model_name}", self.load)]
        rows = s.llm_rows
        if wants(rows, "generate"):
            tasks.append((f"{self.name}: generate()", lambda: self.stock(static=False)))
        if self.device.type == "cuda" and not s.quick and wants(rows, "generate-static"):
            tasks.append((f"{self.name}: generate(static)", lambda: self.stock(static=True)))
        if wants(rows, "llama.cpp"):
            tasks.append((f"{self.name}: llama.cpp", self.llamacpp_row))
        for variant in self.variants():
            tasks.append((f"{self.name}: {self._label(variant)}", lambda v=variant: self.decode_row(v)))
        for kind, label, task in (("prefill", "prefill", lambda: prefill_rows(self)),
                                  ("first-token", "time to first token", lambda: first_token_rows(self)),
                                  ("agreement", "precision agreement", self.agreement)):
            if wants(rows, kind):
                tasks.append((f"{self.name}: {label}", task))
        tasks.append((f"{self.name}: free", self.free))
        return tasks

    def variants(self) -> list[dict]:
        """The rows, as changes from the plain loop's default (auto kernel, the model's dtype, cache
        on, no fast path, plain decoding): each kernel, each precision, cache off, each speculative
        mode, the per-token alternatives on (the events' cost); then the fast path (compiled; its
        weights in the device's default format, in the model's own dtype where that differs, int8)
        and the alternatives' cost on it. Every row passes fast_path explicitly: None would turn
        the fast path on wherever it helps, under a label saying "off"."""
        from pipelines.fast_decode import cpu_weight_format

        default = dict(row="default", attention="auto", precision=None, cache=True, fast_path=False, speculative=None,
                       top_logprobs=0, weights=None, adapter=None)
        rows = [dict(default)]
        dtype = self._dtype()
        for kernel, reason in attention_grid(self.settings, self.device, dtype, "llm"):
            if kernel != "auto":
                rows.append(dict(default, row="kernels", attention=kernel, skip=reason))
        for precision, reason in precision_grid(self.settings, self.device, dtype):
            if precision is not None:
                rows.append(dict(default, row="precisions", precision=precision, skip=reason))
        n = self.settings.new_tokens
        rows.append(dict(default, row="no-cache", cache=False, new_tokens=min(self.settings.cacheless_tokens or n, n)))
        for mode in ("prompt-lookup", "self", "draft"):
            rows.append(dict(default, row="speculative", speculative=mode, skip=None if mode != "draft" or self.settings.draft
                             else "no draft model: pass --draft MODEL (sharing the tokenizer)"))
        # paired: each timed run alternates with one without the alternatives, so drift hits both alike
        rows.append(dict(default, row="events", top_logprobs=5, paired={"top_logprobs": 0}))
        # a LoRA adapter (rank 8 on the attention projections, random weights: its cost is its shape)
        # run unmerged, as the lane runs adapters, and folded into the weights
        rows.append(dict(default, row="adapter", adapter="unmerged"))
        rows.append(dict(default, row="adapter", adapter="merged"))
        # the fast path, in an order that compiles each decoder once: a precision change rebuilds it
        fast = dict(default, row="fast", fast_path=True, weights="auto")
        rows.append(fast)
        rows.append(dict(fast, row="fast-events", top_logprobs=5, paired={"top_logprobs": 0}))
        if cpu_weight_format(self.device)[0] is not None:  # "auto" is not the model's own dtype here
            rows.append(dict(fast, row="fast-own-dtype", weights=None, skip="--quick compiles the fast path twice (auto "
                             "weights and int8); run without --quick for its fp32 row" if self.settings.quick else None))
        int8 = dict(precision_grid(self.settings, self.device, dtype)).get("int8", "int8 is not registered")
        rows.append(dict(fast, row="fast-int8", precision="int8", skip=int8))
        return [row for row in rows if wants(self.settings.llm_rows, row["row"])]

    @staticmethod
    def _pipeline_class():
        from pipelines.text_generation import TextGenerationPipeline

        return TextGenerationPipeline

    def _dtype(self) -> torch.dtype:
        if self.llm is not None:
            return next(self.llm.model.parameters()).dtype
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @staticmethod
    def _label(v: dict) -> str:
        parts = [f"attention={v['attention']}", f"precision={v['precision'] or 'native'}",
                 f"cache={'on' if v['cache'] else 'off'}"]
        if v["fast_path"]:
            parts.append(f"fast path (weights {v['weights'] or 'own dtype'})")
        if v["speculative"]:
            parts.append(f"speculative={v['speculative']}")
        if v["top_logprobs"]:
            parts.append(f"top_logprobs={v['top_logprobs']}")
        if v["adapter"]:
            parts.append(f"LoRA {v['adapter']}")
        return " ".join(parts)

    def load(self):
        TextGenerationPipeline = self._pipeline_class()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            with MemoryDelta(self.device) as delta:
                if self.shape:
                    self.llm = build_llm_shape(self.name, self.device, dtype)
                else:
                    self._import_model_code()
                    self.llm = TextGenerationPipeline.from_pretrained(self.name, device=self.device)
                touch(self.llm.model)
        except (ValueError, OSError) as error:
            self.error = first_line(error)
            raise
        llm = self.llm
        # a benchmark generates exactly new_tokens tokens, as generate(min_new_tokens=...) does
        llm.eos_token_ids = set()
        if self.device.type == "cpu":
            from pipelines.fast_decode import cpu_weight_format

            fmt, reason = cpu_weight_format(self.device)
            self.results.meta["cpu_fast_path_weights"] = {"format": fmt or dtype_name(self._dtype()), "reason": reason}
        config = llm.model.config.to_dict()
        self.arch = self.name if self.shape else reference_name(config, "llm")
        dtype_key = dtype_name(self._dtype())
        self.analysis = inspector.analyse(
            config, device=self.results.ceilings, dtype=dtype_key, prompt_tokens=self.settings.prompt_tokens
        )
        self.weights_bytes = tensor_bytes(llm.model)
        self.results.models.append({
            "lane": "llm", "name": self.model_name, "source": "shape" if self.shape else "pretrained", "arch": self.arch,
            "dtype": dtype_key, "parameters": llm.model.num_parameters(), "weights_bytes": self.weights_bytes,
            "weights_bytes_loaded": delta.bytes, "config": jsonable(config),
        })
        add = self.results.add
        add("inspector", table_row("inspector", model=self.model_name, quantity="parameters", unit="count",
                                   predicted=self.analysis.parameters, measured=llm.model.num_parameters(),
                                   error=relative_error(self.analysis.parameters, llm.model.num_parameters()),
                                   method="model.num_parameters() of the loaded model"))
        add("inspector", table_row("inspector", model=self.model_name, quantity="weights", unit="bytes",
                                   predicted=self.analysis.weight_bytes[dtype_key], measured=delta.bytes,
                                   error=relative_error(self.analysis.weight_bytes[dtype_key], delta.bytes),
                                   method=("allocated by loading (torch.cuda.memory_allocated after - before)"
                                           if self.device.type == "cuda" else "process RSS after loading - before")))

    def _import_model_code(self):
        """Import the model's transformers module before memory is measured: its code is not weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from studio import assets

        with contextlib.suppress(Exception):
            path = assets.resolve(self.name)
            config = AutoConfig.from_pretrained(path)
            AutoModelForCausalLM._model_mapping[type(config)]

    def free(self):
        if getattr(self, "_llamacpp", None) is not None:
            self._llamacpp.close()
            self._llamacpp = None
        self.llm = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base(self, v: dict | None = None, path: str = "studio") -> dict:
        v = v or {}
        return dict(model=self.model_name, arch=getattr(self, "arch", None), path=path,
                    attention=v.get("attention", "sdpa" if path != "studio" else None),
                    precision=v.get("precision") or "native", dtype=dtype_name(self._dtype()), weights=self._weights(v),
                    cache="on" if v.get("cache", True) else "off", fast_path="on" if v.get("fast_path") else "off",
                    speculative=v.get("speculative") or "none", top_logprobs=v.get("top_logprobs", 0),
                    adapter=v.get("adapter") or "none", prompt_tokens=self.settings.prompt_tokens,
                    new_tokens=v.get("new_tokens") or self.settings.new_tokens)

    def _weights(self, v: dict) -> str:
        """The format the matmuls read the weights in: the precision asked for, else on the fast
        path with weights="auto" the device's default (bf16 on a CPU that multiplies it in
        hardware), else the model's own dtype."""
        if v.get("precision"):
            return v["precision"]
        if v.get("fast_path") and v.get("weights") == "auto":
            from pipelines.fast_decode import cpu_weight_format

            return cpu_weight_format(self.device)[0] or dtype_name(self._dtype())
        return dtype_name(self._dtype())

    def _not_loaded(self, table: str, base: dict) -> bool:
        if self.llm is None:
            reason = f"the model did not load: {self.error}"
            self.results.add(table, table_row(table, status="skipped", reason=reason, **base))
            return True
        return False

    def prompts(self, tokens: int | None = None) -> list[str]:
        """Prompts of about `tokens` (default: prompt_tokens) tokens, a different one for every run."""
        s, tokenizer = self.settings, self.llm.tokenizer
        tokens = tokens or s.prompt_tokens
        prompts = []
        for seed in range(s.warmup + s.repeats):
            rng = random.Random(seed)
            text = " ".join(rng.choice(_WORDS) for _ in range(2 * tokens))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
            prompts.append(tokenizer.decode(ids))
        return prompts

    def _draft(self, speculative):
        if speculative == "self":
            return max(1, self.llm.shape.layers // 4)
        if speculative == "draft":
            if not hasattr(self, "_draft_llm"):
                self._draft_llm = self._pipeline_class().from_pretrained(self.settings.draft, device=self.device)
            return self._draft_llm
        return None

    def decode_row(self, v: dict) -> dict:
        base = self._base(v)
        if self._not_loaded("llm", base):
            return None
        if v.get("skip"):
            return self.results.add("llm", table_row("llm", status="skipped", reason=v["skip"], **base))
        if v["fast_path"]:
            from pipelines.fast_decode import unsupported_reason

            reason = unsupported_reason(self.llm.model)
            if reason:
                return self.results.add("llm", table_row("llm", status="skipped", reason=f"the fast path: {reason}",
                                                         **base))
        return or_failed(self.results, "llm", base, self._decode_row, v, base)

    def _fast_decoder(self, v: dict) -> None:
        """The fast path for the row, compiled (compile=True: each shape compiles before its first
        step, so the warm-up holds it and `compiled` says how long) with the row's weights and
        precision, built here as the stream's decoder_for would build it (which then keeps it)."""
        from pipelines.fast_decode import FastDecoder

        llm, precision = self.llm, v["precision"]
        current = llm.fast_decoder
        if (current is None or current.compile is not True or current.weights_option != v["weights"]
                or current.precision != precision):
            llm.fast_decoder = None  # free the old decoder's weights and compiled graphs first
            gc.collect()
            backends.sync_precision([llm.model], precision)  # the model as the stream will set it
            llm.fast_decoder = FastDecoder(llm.model, precision, compile=True, weights=v["weights"])

    def _compile_shapes(self, prompts: list[str], new_tokens: int) -> None:
        """Compile every cache length the timed runs will meet (their prompts differ by a token or
        two, and a length past a power of two is a new shape), so that none compiles while timed."""
        from pipelines.fast_llama import cache_length

        llm = self.llm
        for length in {len(llm.tokenizer(p)["input_ids"]) for p in prompts}:
            llm.fast_decoder.warm_up(1, cache_length(length + new_tokens, llm.context_length))

    def _compile_seconds(self) -> float:
        """Seconds the fast path spent compiling since this was last asked (0 when nothing compiled)."""
        decoder = self.llm.fast_decoder
        if decoder is None:
            return 0.0
        if decoder is not getattr(self, "_counted_decoder", None):
            self._counted_decoder, self._counted_shapes = decoder, set()
        fresh = {shape: s for shape, s in decoder.compiled.items() if shape not in self._counted_shapes}
        self._counted_shapes.update(fresh)
        return sum(fresh.values())

    def _decode_row(self, v: dict, base: dict) -> dict:
        s, llm = self.settings, self.llm
        n = base["new_tokens"]  # the cache-off row may generate fewer (Settings.cacheless_tokens)
        # fast_path passed either way: None would turn it on wherever it helps, under a label saying "off"
        kwargs = dict(max_new_tokens=n, use_cache=v["cache"], top_logprobs=v["top_logprobs"],
                      speculative=v["speculative"], draft=self._draft(v["speculative"]), fast_path=v["fast_path"])
        prompts = self.prompts()
        # --quick warms up on two new tokens: prefill and decode have run once, which is what warm-up is for
        warm = dict(kwargs, max_new_tokens=min(2, n)) if s.quick else kwargs
        notes = []
        if v["fast_path"]:
            self._fast_decoder(v)
            self._compile_seconds()  # what compiled before this row is not this row's
            llm.fast_path_error = None
        adapter = self._adapter() if v["adapter"] else None
        if v["adapter"] == "unmerged":
            kwargs["adapter"] = warm["adapter"] = adapter.name
        # a scope, not the shared pipeline's defaults: the variant holds for these runs only; a
        # merged adapter is folded into the weights for the row and taken out exactly after it
        folded = merged({"model": llm.model}, adapter) if v["adapter"] == "merged" else contextlib.nullcontext()
        with backends.use(attention=v["attention"], precision=v["precision"]), folded:
            started = perf_counter()
            for prompt in prompts[: s.warmup]:
                self.generate(prompt, warm)
            if v["fast_path"]:
                self._compile_shapes(prompts[s.warmup:], n)
            compile_s = self._compile_seconds() if v["fast_path"] else None
            warmup_ms = (perf_counter() - started) * 1e3 - (compile_s or 0) * 1e3  # compiling is reported apart
            with PeakMemory(self.device) as memory:
                runs, off = [], []
                for prompt in prompts[s.warmup:]:
                    if v.get("paired"):
                        off.append(self.generate(prompt, dict(kwargs, **v["paired"])))
                    runs.append(self.generate(prompt, kwargs))
        if v["fast_path"]:
            decoder = llm.fast_decoder
            if llm.fast_path_error:  # it fell back to the plain loop: these are not the fast path's figures
                raise RuntimeError(f"the fast path fell back to the plain loop: {llm.fast_path_error}")
            base["weights"] = decoder.weights or dtype_name(decoder.dtype)
            late = self._compile_seconds()
            if late:
                compile_s += late
                notes.append(f"a new shape compiled inside the timed runs ({late:.0f} s): decode figures include it")
            if decoder.compile_error or decoder.capture_error:
                notes.append("; ".join(e for e in (decoder.compile_error, decoder.capture_error) if e))
        ceilings, dtype = self.results.ceilings, peak_key(base["weights"], self._dtype())
        ttft, _, _ = median_spread([r["ttft_ms"] for r in runs])
        tok_s, tok_s_min, tok_s_max = median_spread([r["decode_tok_s"] for r in runs])
        prefill_ms = statistics.median(r["prefill_ms"] for r in runs)
        prefill_flops = runs[0]["prefill_flops"]
        prompt_len = runs[0]["prompt_len"]
        # bytes one plain decode step moves per token (weights, KV cache, logits), mid-generation
        flops_tok, bytes_tok = decoder_step_cost(llm.shape, 1, 1, prompt_len + n // 2)
        bytes_tok = bytes_tok * _bytes_scale(llm, base["weights"])
        step_ms = 1e3 / tok_s if tok_s else None
        kv_tokens = prompt_len + n - 1
        plain = v["cache"] and not v["speculative"]
        row = self.results.add("llm", table_row(
            "llm", status="ok", reason="; ".join(notes) or None, repeats=len(runs), warmup_ms=warmup_ms,
            compile_s=compile_s, ttft_ms=ttft, ttft_ms_min=min(r["ttft_ms"] for r in runs), ttft_ms_max=max(r["ttft_ms"] for r in runs),
            prefill_ms=prefill_ms, prefill_tok_s=prompt_len / prefill_ms * 1e3,
            prefill_tflop_s=prefill_flops / prefill_ms / 1e9,
            prefill_share_of_peak=prefill_flops / (prefill_ms / 1e3) / matmul_peak(ceilings, dtype),
            decode_tok_s=tok_s, decode_tok_s_min=tok_s_min, decode_tok_s_max=tok_s_max,
            decode_step_ms=median_spread([r["decode_step_ms"] for r in runs])[0],
            decode_gb_s=bytes_tok * tok_s / 1e9 if tok_s else None,
            decode_share_of_roofline=roofline_share(flops_tok, bytes_tok, step_ms, ceilings, dtype),
            acceptance_rate=median_spread([r["acceptance_rate"] for r in runs])[0],
            run_ms=statistics.median(r["run_ms"] for r in runs),
            paired_overhead=paired_overhead(runs, off, "run_ms"),
            weights_bytes=self.weights_bytes,
            kv_bytes=runs[-1]["kv_bytes"] if v["cache"] else 0,
            kv_bytes_predicted=self.analysis.kv_bytes_per_token * kv_tokens if plain else None,
            activations_bytes=inspector.decoder_activation_bytes(
                self.analysis, 1 if v["cache"] else prompt_len + n, prompt_len + n,
                eager=v["attention"] == "eager"),
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))
        if self.stock_tok_s and tok_s:
            row["speedup_vs_stock"] = tok_s / self.stock_tok_s
        if v["row"] == "default":
            row["_cost"] = {"prefill": (prefill_flops, runs[0]["prefill_bytes"]), "decode": (flops_tok, bytes_tok)}
            self._inspect_decode(row, runs, kv_tokens)
        return row

    def _adapter(self):
        """A LoRA of rank 8 on the model's attention projections with random weights, loaded into
        the pipeline once: what an adapter costs depends on its shape, not on what it learned."""
        if "bench" not in self.llm.adapters:
            self.llm.adapters["bench"] = random_adapter("bench", {"model": self.llm.model},
                                                        ("q_proj", "k_proj", "v_proj", "o_proj"), rank=8)
        return self.llm.adapters["bench"]

    def generate(self, prompt: str, kwargs: dict) -> dict:
        """One generation, timed on the host (time to first token, decode tokens/s) and from the
        events (device time of prefill and of each decode step)."""
        started = perf_counter()
        first, events = None, []
        for event in self.llm.stream(prompt, **kwargs):
            if first is None and event.phase in ("prefill", "decode"):
                first = perf_counter()
            events.append(event)
        synchronize(self.device)
        total = perf_counter() - started
        tokens = [e for e in events if e.phase in ("prefill", "decode")]
        prefill = next(e for e in events if e.phase == "prefill")
        decode_ms = [e.ms for e in events if e.phase == "decode" and e.timing is not None]
        drafted = [e.drafted for e in events if e.drafted is not None]
        accepted = sum(1 for e in events if e.from_draft)
        return {
            "ttft_ms": (first - started) * 1e3,
            "decode_tok_s": (len(tokens) - 1) / (total - (first - started)) if len(tokens) > 1 else None,
            "decode_step_ms": statistics.median(decode_ms) if decode_ms and not drafted else None,
            "prefill_ms": prefill.ms, "prefill_flops": prefill.flops, "prefill_bytes": prefill.bytes,
            "prompt_len": len(events[0].token_ids),
            "kv_bytes": tokens[-1].kv_cache_bytes,
            "acceptance_rate": accepted / max(1, sum(len(d) for d in drafted)) if drafted else None,
            "run_ms": total * 1e3,
        }

    def _inspect_decode(self, row: dict, runs: list[dict], kv_tokens: int):
        """Predicted against measured for the default row: KV cache, peak, time per step."""
        a, add, name = self.analysis, self.results.add, self.model_name
        measured_per_token = row["kv_bytes"] / kv_tokens if row["kv_bytes"] else None
        add("inspector", table_row("inspector", model=name, quantity="KV cache per token", unit="bytes",
                                   predicted=a.kv_bytes_per_token, measured=measured_per_token,
                                   error=relative_error(a.kv_bytes_per_token, measured_per_token),
                                   method=f"kv_cache_bytes of the last event / {kv_tokens} cached tokens"))
        add("inspector", table_row("inspector", model=name, quantity=f"KV cache, {kv_tokens} tokens", unit="bytes",
                                   predicted=row["kv_bytes_predicted"], measured=row["kv_bytes"],
                                   error=relative_error(row["kv_bytes_predicted"], row["kv_bytes"]),
                                   method="the lane's kv_cache_bytes: its key and value tensors as allocated"))
        predicted_peak = self.weights_bytes + (row["kv_bytes_predicted"] or 0) + row["activations_bytes"]
        if self.device.type == "cuda":
            add("inspector", table_row("inspector", model=name, quantity="decode peak memory", unit="bytes",
                                       predicted=predicted_peak, measured=row["peak_mem_bytes"],
                                       error=relative_error(predicted_peak, row["peak_mem_bytes"]),
                                       method="weights + KV + activations (estimate) vs torch.cuda.max_memory_allocated"))
        else:
            extra = (row["kv_bytes_predicted"] or 0) + row["activations_bytes"]
            add("inspector", table_row("inspector", model=name, quantity="decode memory growth", unit="bytes",
                                       predicted=extra, measured=row["peak_growth_bytes"],
                                       error=relative_error(extra, row["peak_growth_bytes"]),
                                       method="KV + activations (estimate) vs peak RSS growth "
                                              "(weights were resident before)"))
        # the roofline's time on this device, against the measured device time
        prefill = a.predicted(self.results.ceilings.name, "prefill").ms
        decode = a.predicted(self.results.ceilings.name, "decode").ms
        add("inspector", table_row("inspector", model=name, quantity="prefill time", unit="ms", predicted=prefill,
                                   measured=row["prefill_ms"], error=relative_error(prefill, row["prefill_ms"]),
                                   method="roofline on this device's ceilings vs the prefill event's device time"))
        add("inspector", table_row("inspector", model=name, quantity="decode time per token", unit="ms", predicted=decode,
                                   measured=1e3 / row["decode_tok_s"] if row["decode_tok_s"] else None,
                                   error=relative_error(decode, 1e3 / row["decode_tok_s"] if row["decode_tok_s"] else None),
                                   method="roofline on this device's ceilings vs 1 / decode tokens per second "
                                          "(wall clock)"))

    def agreement(self):
        """The precision-agreement table: top-1 agreement and the largest logit difference of each
        precision against the model's own dtype, over agreement_tokens greedy positions."""
        if self.llm is None:
            for precision in PRECISIONS:
                self.results.add("agreement", table_row("agreement", model=self.model_name, precision=precision,
                                                        status="skipped", reason=f"the model did not load: {self.error}"))
            return
        agreement_rows(self.results, self.llm, self.model_name, self.settings.agreement_tokens)

    # -----------------------------------------------------------------------------------------
    # llama.cpp on the same GGUF file

    def llamacpp_reason(self) -> str | None:
        """Why llama.cpp cannot run next to this model here, or None."""
        from studio.bench import llamacpp

        if self.device.type != "cpu":
            return "llama.cpp is compared on the CPU, with the lane's threads: run with --device cpu"
        if self.shape:
            return "random weights: there is no GGUF file for llama.cpp to load"
        return llamacpp.gguf_path(self.name)[1] or llamacpp.unavailable()

    def llamacpp_runner(self):
        """llama.cpp on the GGUF file this model was loaded from, with as many threads as torch
        uses and a context for the longest prompt of the run; loaded once per model."""
        from studio.bench import llamacpp

        if getattr(self, "_llamacpp", None) is None:
            s = self.settings
            context = 256 * -(-(2 * max(s.prompt_tokens, s.prefill_tokens) + s.new_tokens) // 256)
            self._llamacpp = llamacpp.LlamaCpp(llamacpp.gguf_path(self.name)[0], context, torch.get_num_threads())
            self.results.meta["llama.cpp"] = llamacpp.version()
        return self._llamacpp

    def llamacpp_row(self):
        """llama.cpp (greedy, its own kernels and quantized weights) on the same prompts, new tokens
        and threads, timed as the lane's and generate()'s rows are."""
        base = dict(self._base(path="llama.cpp"), attention="llama.cpp", precision=None, weights=None)
        if self._not_loaded("llm", base):
            return None
        reason = self.llamacpp_reason()
        if reason:
            return self.results.add("llm", table_row("llm", status="skipped", reason=reason, **base))
        return or_failed(self.results, "llm", base, self._llamacpp_row, base)

    def _llamacpp_row(self, base: dict) -> dict:
        s = self.settings
        started = perf_counter()
        runner = self.llamacpp_runner()
        base.update(precision=runner.quantization, weights=runner.quantization)
        prompts = self.prompts()
        for prompt in prompts[: s.warmup]:
            runner.generate(prompt, min(2, s.new_tokens) if s.quick else s.new_tokens)
        warmup_ms = (perf_counter() - started) * 1e3
        with PeakMemory(self.device) as memory:
            runs = [runner.generate(prompt, s.new_tokens) for prompt in prompts[s.warmup:]]
        tok_s, tok_s_min, tok_s_max = median_spread([r["decode_tok_s"] for r in runs])
        flops_tok, _ = decoder_step_cost(self.llm.shape, 1, 1, runs[0]["prompt_len"] + s.new_tokens // 2)
        return self.results.add("llm", table_row(
            "llm", status="ok", reason=f"{runner.threads} threads, {self.results.meta['llama.cpp']}",
            repeats=len(runs), warmup_ms=warmup_ms,
            ttft_ms=median_spread([r["ttft_ms"] for r in runs])[0],
            ttft_ms_min=min(r["ttft_ms"] for r in runs), ttft_ms_max=max(r["ttft_ms"] for r in runs),
            decode_tok_s=tok_s, decode_tok_s_min=tok_s_min, decode_tok_s_max=tok_s_max,
            decode_gb_s=runner.weights_bytes * tok_s / 1e9 if tok_s else None,  # its quantized weights, once a token
            decode_share_of_roofline=roofline_share(flops_tok, runner.weights_bytes, 1e3 / tok_s if tok_s else None,
                                                    self.results.ceilings, "fp32"),
            speedup_vs_stock=tok_s / self.stock_tok_s if self.stock_tok_s and tok_s else None,
            run_ms=statistics.median(r["run_ms"] for r in runs), weights_bytes=runner.weights_bytes,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))

    # -----------------------------------------------------------------------------------------
    # transformers' generate()

    def stock(self, static: bool) -> dict:
        """transformers' generate(), greedy, on the same model and prompts, with its own SDPA attention:
        time to first token from a streamer, decode tokens/s as (new tokens - 1) / (total - TTFT)."""
        path = "transformers generate(static cache)" if static else "transformers generate()"
        base = self._base(path=path)
        if self._not_loaded("llm", base):
            return None
        return or_failed(self.results, "llm", base, self._stock, static, base, path)

    def _stock(self, static: bool, base: dict, path: str) -> dict:
        s, llm = self.settings, self.llm
        prompts = self.prompts()
        with self.stock_model():
            started = perf_counter()
            for prompt in prompts[: s.warmup]:
                self.stock_generate(prompt, static)
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(self.device) as memory:
                runs = [self.stock_generate(prompt, static) for prompt in prompts[s.warmup:]]
        tok_s, tok_s_min, tok_s_max = median_spread([r["decode_tok_s"] for r in runs])
        if not static:
            self.stock_tok_s = tok_s
            for row in self.results.tables["llm"]:  # rows measured before this one
                if row["model"] == self.model_name and row["path"] == "studio" and row["decode_tok_s"] and tok_s:
                    row["speedup_vs_stock"] = row["decode_tok_s"] / tok_s
        prompt_len = runs[0]["prompt_len"]
        flops_tok, bytes_tok = decoder_step_cost(llm.shape, 1, 1, prompt_len + s.new_tokens // 2)
        dtype = peak_key(None, self._dtype())
        return self.results.add("llm", table_row(
            "llm", status="ok", repeats=len(runs), warmup_ms=warmup_ms,
            ttft_ms=median_spread([r["ttft_ms"] for r in runs])[0],
            ttft_ms_min=min(r["ttft_ms"] for r in runs), ttft_ms_max=max(r["ttft_ms"] for r in runs),
            decode_tok_s=tok_s, decode_tok_s_min=tok_s_min, decode_tok_s_max=tok_s_max,
            decode_gb_s=bytes_tok * tok_s / 1e9 if tok_s else None,
            decode_share_of_roofline=roofline_share(flops_tok, bytes_tok, 1e3 / tok_s if tok_s else None,
                                                         self.results.ceilings, dtype),
            speedup_vs_stock=1.0 if not static else (tok_s / self.stock_tok_s if self.stock_tok_s and tok_s else None),
            run_ms=statistics.median(r["run_ms"] for r in runs), weights_bytes=self.weights_bytes,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))

    @contextlib.contextmanager
    def stock_model(self):
        """The model as transformers ships it, for generate(): its own dtype, its own SDPA attention."""
        from studio.integrations.transformers import use_studio_attention

        backends.restore_precision(self.llm.model)
        self.llm.model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            use_studio_attention(self.llm.model)

    def stock_generate(self, prompt: str, static: bool = False, new_tokens: int | None = None) -> dict:
        """One greedy generate() of exactly new_tokens (default: the settings') tokens, timed as the
        lane is (inside stock_model())."""
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        llm, n = self.llm, new_tokens or self.settings.new_tokens

        class FirstToken(BaseStreamer):
            """generate() hands the streamer the prompt, then each new token (already on the host)."""

            def __init__(self):
                self.puts, self.first = 0, None

            def put(self, value):
                self.puts += 1
                if self.puts == 2:
                    self.first = perf_counter()

            def end(self):
                pass

        streamer = FirstToken()
        # greedy, exactly n new tokens; a fresh config, so that no sampling default of the model applies
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=llm.pad_token_id,
                                  eos_token_id=llm.model.generation_config.eos_token_id,
                                  cache_implementation="static" if static else None)
        started = perf_counter()
        encoded = llm.tokenizer(prompt, return_tensors="pt").to(self.device)  # timed, as the lane's tokenize is
        with torch.no_grad():
            out = llm.model.generate(**encoded, generation_config=config, streamer=streamer)
        synchronize(self.device)
        total = perf_counter() - started
        new = out.shape[1] - encoded["input_ids"].shape[1]
        ttft = streamer.first - started
        return {"ttft_ms": ttft * 1e3, "decode_tok_s": (new - 1) / (total - ttft) if new > 1 else None,
                "prompt_len": encoded["input_ids"].shape[1], "run_ms": total * 1e3}


def _bytes_scale(llm, weights: str | None) -> float:
    """Weight bytes per decode step change with the format the weights are read in: 1-byte
    int8/fp8, 2-byte bf16/fp16 (a registered precision of unknown size: as the model's dtype)."""
    size = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}.get(weights)
    if size is None:
        return 1.0
    return size / llm.shape.dtype_bytes
