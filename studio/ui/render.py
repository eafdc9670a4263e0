"""What the app shows, computed from the lanes' events: token chips, the coloured token stream,
bar-chart tables, counters, roofline placements, the shared timeline, and a run compared with
the same run without its LoRA adapter.

Plain functions from events to HTML strings, lists and DataFrames, so they are tested without a
browser. Depends on pandas and the studio core; never on Gradio or a pipeline's internals.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import torch

from studio.profiling import Ceilings, roofline


def _escape(text: str) -> str:
    return html.escape(text).replace(" ", "&nbsp;").replace("\n", "↵")


def token_chips(tokens: list[str], token_ids: list[int], tokenizer=None) -> str:
    """The prompt as the model sees it: one chip per token, its id underneath."""
    pieces = [tokenizer.decode([i]) for i in token_ids] if tokenizer is not None else tokens
    chips = "".join(
        f'<span class="chip"><span class="chip-text">{_escape(text) or "&nbsp;"}</span><sub>{i}</sub></span>'
        for text, i in zip(pieces, token_ids)
    )
    return f'<div class="chips" title="{len(token_ids)} tokens">{chips}</div>'


def token_stream(events) -> list[tuple[str, float]]:
    """Generated tokens for a HighlightedText, each scored 2p - 1 so that likely tokens show green
    and unlikely ones red (p: the probability the model gave the token it emitted)."""
    return [(ev.text or "·", 2 * math.exp(ev.logprob) - 1) for ev in events if ev.token_id is not None]


def alternatives_table(event) -> pd.DataFrame:
    """The top alternatives at one step, under the model's distribution and after the sampling
    settings, one bar each. The labels carry the rank, so that the chart's alphabetical order of
    categories is the order of likelihood."""
    rows = []
    for kind, top in (("model", event.top), ("sampled", event.top_processed)):
        rows += [(f"{rank}. {text!r} ({kind})", prob, kind) for rank, (text, _, prob) in enumerate(top, 1)]
    return pd.DataFrame(rows, columns=["token", "probability", "distribution"])


def step_times(events, phases: tuple[str, ...]) -> pd.DataFrame:
    """One bar per timed step: its index along the run (zero-padded: the chart orders categories
    alphabetically), device milliseconds and phase."""
    timed = [e for e in events if e.phase in phases and e.timing is not None]
    width = len(str(max(len(timed) - 1, 0)))
    rows = [(f"{n:0{width}d}", ev.ms, ev.phase) for n, ev in enumerate(timed)]
    # every phase from the first update on (a zero-height bar until it runs): the chart fixes its
    # colours on its first data and would leave out the bars of a phase it had not seen
    rows += [(f"{0:0{width}d}", 0.0, phase) for phase in phases if phase not in {ev.phase for ev in timed}]
    return pd.DataFrame(rows, columns=["step", "ms", "phase"])


def stage_roofline(events, ceilings: Ceilings, dtype: torch.dtype):
    """Where the events of one stage sit on the roofline, taken together (None if nothing was counted)."""
    timed = [e for e in events if e.timing is not None and e.flops and e.bytes]
    if not timed:
        return None
    return roofline(sum(e.flops for e in timed), sum(e.bytes for e in timed), sum(e.ms for e in timed), ceilings, dtype)


def roofline_text(name: str, point) -> str:
    if point is None:
        return f"{name}: not counted"
    ceiling = "bandwidth" if point.bound == "memory" else "matmul peak"
    return (
        f"{name}: {point.intensity:.1f} FLOP/byte → **{point.bound}-bound**, "
        f"{point.share:.1%} of the {ceiling} ({point.achieved_flops / 1e9:.1f} GFLOP/s, "
        f"{point.achieved_bandwidth / 1e9:.1f} GB/s)"
    )


def adapter_line(events) -> list[str]:
    """The LoRA adapter a run added, if any, as a counters line."""
    adapter = next((e.adapter for e in events if getattr(e, "adapter", None)), None)
    return [f"LoRA adapter **{adapter}**, added unmerged to the layers it targets"] if adapter else []


def llm_counters(events, ceilings: Ceilings | None, dtype: torch.dtype | None, runtime: list[str] = ()) -> str:
    """Counters under the LLM lane; without ceilings (a remote model) the times are wall-clock and no
    roofline is drawn. `runtime`: lines about what ran it (the fast path's state, the CPU threads)."""
    prefill = [e for e in events if e.phase == "prefill"]
    decode = [e for e in events if e.phase == "decode" and e.timing is not None]
    tokenize = [e for e in events if e.phase == "tokenize"]
    lines = []
    if prefill:
        ttft = sum(e.ms for e in tokenize[:1] + prefill[:1])
        prompt = f" (prompt of {len(tokenize[0].token_ids)} tokens)" if tokenize else ""
        lines.append(f"time to first token **{ttft:.1f} ms**{prompt}")
    generated = sum(1 for e in events if e.phase == "decode")
    if decode:
        ms = sum(e.ms for e in decode)
        lines.append(f"decode **{1000 * generated / ms:.1f} tokens/s** ({generated} tokens in {ms:.0f} ms)")
    kv = [e.kv_cache_bytes for e in events if e.kv_cache_bytes is not None]
    if kv:
        lines.append(f"KV cache {kv[-1] / 2**10:.1f} KiB" if kv[-1] else "KV cache off: every step recomputes")
    drafted = [e for e in events if e.drafted is not None]
    if drafted:
        accepted = sum(1 for e in events if e.from_draft)
        proposed = sum(len(e.drafted) for e in drafted)
        lines.append(
            f"speculative: {accepted}/{proposed} drafts accepted, "
            f"{generated / len(drafted):.2f} tokens per target forward"
        )
    lines += adapter_line(events)
    if ceilings is None:
        lines.append("times are wall-clock per token, measured here, of a remote server")
    else:
        lines.append(roofline_text("prefill", stage_roofline(prefill, ceilings, dtype)))
        lines.append(roofline_text("decode", stage_roofline(decode, ceilings, dtype)))
    return "  \n".join(lines + list(runtime))


def diffusion_counters(events, ceilings: Ceilings, dtype: torch.dtype, runtime: list[str] = ()) -> str:
    """Counters under the diffusion lane; `runtime`: lines about what ran it (the fast path's state)."""
    denoise = [e for e in events if e.phase == "denoise"]
    lines = []
    if denoise:
        steady = [e for e in denoise if not e.warmup] or denoise
        ms = sum(e.ms for e in steady)
        lines.append(
            f"**{1000 * len(steady) / ms:.2f} it/s** ({ms / len(steady):.1f} ms per step"
            f"{', warm-up step excluded' if len(steady) < len(denoise) else ''})"
        )
        last = denoise[-1]
        lines.append(
            f"**{last.forward_passes} denoiser forward passes** for {len(denoise)} steps "
            f"({last.passes} per step{' — classifier-free guidance doubles them' if last.passes == 2 else ''})"
        )
        lines.append(roofline_text("denoising step", stage_roofline(steady, ceilings, dtype)))
    lines += adapter_line(events)
    decode = [e for e in events if e.phase == "decode"]
    if decode:
        lines.append(f"VAE decode {decode[0].ms:.1f} ms")
        lines.append(roofline_text("VAE decode", stage_roofline(decode, ceilings, dtype)))
    return "  \n".join(lines + list(runtime))


def chosen_steps(events) -> list:
    """The steps that chose a token, of the first prompt."""
    return [e for e in events if e.token_id is not None and getattr(e, "sequence", 0) == 0]


def first_divergence(without, adapted) -> int | None:
    """The first generated token (0-based) at which two runs of one prompt and seed chose
    differently; None while they agree."""
    pairs = zip(chosen_steps(without), chosen_steps(adapted))
    return next((i for i, (a, b) in enumerate(pairs) if a.token_id != b.token_id), None)


def _choice(event) -> str:
    return f"<code>{_escape(repr(event.text or ''))}</code> {math.exp(event.logprob):.0%}"


def _top(event, other, k: int) -> str:
    """A step's top-k as 'token p' pieces, the token the other run chose in bold."""
    pieces = []
    for text, token_id, prob in event.top[:k]:
        piece = f"{_escape(repr(text))} {prob:.0%}"
        pieces.append(f"<b>{piece}</b>" if other is not None and token_id == other.token_id else piece)
    return " · ".join(pieces)


def token_comparison(without, adapted, adapter: str, k: int = 5) -> str:
    """Two runs of one prompt and seed, without and with a LoRA adapter, token by token: the token
    each chose and its probability, each next-token distribution's top k (the other run's choice in
    bold), and the first token where they part highlighted. After it each run continues its own
    text, so later rows compare distributions over different contexts."""
    a, b = chosen_steps(without), chosen_steps(adapted)
    first = first_divergence(without, adapted)
    if first is None:
        headline = f"the same {min(len(a), len(b))} tokens so far without and with <b>{_escape(adapter)}</b>"
    else:
        headline = (f"they part at token {first + 1}: {_choice(a[first])} without, {_choice(b[first])} with "
                    f"<b>{_escape(adapter)}</b>; from there each continues its own text")
    rows = []
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        kind = "same" if first is None or i < first else "diverge" if i == first else "apart"
        cells = [str(i + 1), _choice(x) if x else "", _choice(y) if y else "",
                 _top(x, y, k) if x else "", _top(y, x, k) if y else ""]
        rows.append(f'<tr class="{kind}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("token", "without", "with", f"top {k} without", f"top {k} with"))
    return (f'<div class="compare"><p>{headline}</p><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def pixel_difference(a, b) -> float:
    """The mean absolute difference of two images' RGB values, out of 255."""
    x, y = (np.asarray(image.convert("RGB"), dtype=np.float32) for image in (a, b))
    return float(np.abs(x - y).mean()) if x.shape == y.shape else math.nan


def _main_shape(shapes: dict) -> str:
    if not shapes:
        return ""
    key, shape = next(reversed(shapes.items()))
    return f"{key} {tuple(shape)}"


def stages(events, lane: str) -> list[dict]:
    """Consecutive events of one phase grouped into a stage: name, count, ms, and the shapes
    flowing through it (those of its first step)."""
    grouped: list[dict] = []
    for ev in events:
        if getattr(ev, "sequence", 0) != 0 or ev.timing is None:
            continue
        if grouped and grouped[-1]["phase"] == ev.phase:
            grouped[-1]["count"] += 1
            grouped[-1]["ms"] += ev.ms
        else:
            grouped.append(dict(lane=lane, phase=ev.phase, count=1, ms=ev.ms, shapes=dict(ev.shapes)))
    return grouped


def timeline(llm_stages: list[dict], diffusion_stages: list[dict]) -> str:
    """Both lanes' stages as two rows of blocks, widths proportional to device time, each labelled
    with the tensor shapes that flow through it."""
    total = max(sum(s["ms"] for s in llm_stages), sum(s["ms"] for s in diffusion_stages), 1e-9)
    rows = []
    for label, lane_stages in (("LLM", llm_stages), ("diffusion", diffusion_stages)):
        blocks = []
        for s in lane_stages:
            name = s["phase"] + (f" ×{s['count']}" if s["count"] > 1 else "")
            shapes = "; ".join(f"{k} {tuple(v)}" for k, v in s["shapes"].items() if not k.startswith("block "))
            blocks.append(
                f'<div class="stage stage-{s["phase"]}" style="flex-grow:{s["ms"] / total:.6f}" '
                f'title="{html.escape(shapes)}"><b>{html.escape(name)}</b> {s["ms"]:.0f} ms'
                f'<small>{html.escape(_main_shape(s["shapes"]))}</small></div>'
            )
        rest = 1 - sum(s["ms"] for s in lane_stages) / total
        blocks.append(f'<div class="stage-rest" style="flex-grow:{max(rest, 0):.6f}"></div>')
        rows.append(f'<div class="lane-row"><span class="lane-label">{label}</span>{"".join(blocks)}</div>')
    if not llm_stages and not diffusion_stages:
        return '<div class="timeline empty">Run a lane to see its stages here.</div>'
    return f'<div class="timeline">{"".join(rows)}</div>'


CSS = """
.chips { display: flex; flex-wrap: wrap; gap: 4px; }
.chip { display: inline-flex; flex-direction: column; align-items: center; padding: 2px 6px;
        border-radius: 6px; background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
        font-family: var(--font-mono); font-size: 0.85em; }
.chip sub { color: var(--body-text-color-subdued); font-size: 0.75em; }
.timeline { display: flex; flex-direction: column; gap: 6px; }
.lane-row { display: flex; align-items: stretch; gap: 2px; min-height: 46px; }
.lane-label { width: 80px; flex-shrink: 0; font-weight: 600; align-self: center; }
.stage { min-width: 70px; padding: 3px 6px; border-radius: 4px; font-size: 0.8em; overflow: hidden;
         color: #111; display: flex; flex-direction: column; }
.stage small { color: #333; white-space: nowrap; }
.stage-tokenize { background: #d8e2ff; } .stage-prefill { background: #8fb0ff; } .stage-decode { background: #c6f0c2; }
.stage-encode { background: #ffe0b3; } .stage-denoise { background: #ffc2c2; }
.stage-rest { min-width: 0; }
.compare { max-height: 420px; overflow-y: auto; }
.compare table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
.compare th, .compare td { padding: 2px 6px; border-bottom: 1px solid var(--border-color-primary); text-align: left; }
.compare th { position: sticky; top: 0; background: var(--background-fill-primary); }
.compare tr.diverge { background: #ffe08a; color: #111; }
.compare tr.apart { color: var(--body-text-color-subdued); }
#studio-title p { margin: 0; }
/* an image fills its frame, a small one enlarged with square pixels (a big one shrinks smoothly: pixelated
   only scales up by nearest neighbour); the file, and its download, stays the real size */
.pixels img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain !important; }
"""
