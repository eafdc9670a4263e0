"""The LLM lane on tiny random Llama, GPT-2 and Qwen2 models, against transformers' own generate()."""

import struct
import threading

import pytest
import torch
from tiny_models import LLM_FAMILIES, tiny_llm

from pipelines.fast_decode import FastDecoder, unsupported_reason
from pipelines.sampling import SamplingSettings
from pipelines.speculative import self_draft_model
from pipelines.text_generation import TextGenerationPipeline
from studio.loading import LoadError

PROMPT = "The cat sat on the mat. The cat sat"


@pytest.fixture(scope="module", params=LLM_FAMILIES)
def llm(request, tokenizer):
    pipeline = TextGenerationPipeline(tiny_llm(request.param), tokenizer)
    if unsupported_reason(pipeline.model) is None:
        # the fast path, on by default, in the model's own dtype: transformers' tokens exactly (its
        # default on a CPU with bf16 instructions, bf16 weights, is held to its agreement in test_fast_path)
        pipeline.fast_decoder = FastDecoder(pipeline.model, weights=None)
    return pipeline


def stock_greedy(pipeline, prompts, max_new_tokens):
    """transformers' generate(), greedy, on the same left-padded batch."""
    tok = pipeline.tokenizer
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = pipeline.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [row[batch["input_ids"].shape[1] :].tolist() for row in out]


def until_eos(ids, eos=256, pad=257):
    kept = []
    for t in ids:
        if t == pad:
            break
        kept.append(t)
        if t == eos:
            break
    return kept


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_matches_transformers_generate(llm, use_cache):
    expected = stock_greedy(llm, [PROMPT], 12)[0]
    out = llm(PROMPT, max_new_tokens=12, use_cache=use_cache)
    assert out.token_ids == until_eos(expected)


def test_padded_batch_matches_generate_and_one_by_one(llm):
    prompts = [PROMPT, "A dog", "Once upon a time there"]
    expected = stock_greedy(llm, prompts, 10)
    outs = llm(prompts, max_new_tokens=10)
    for prompt, out, stock in zip(prompts, outs, expected):
        assert out.token_ids == until_eos(stock)
        assert out.token_ids == llm(prompt, max_new_tokens=10).token_ids


def test_sampling_is_reproducible_by_seed(llm):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95)
    first = llm(PROMPT, seed=7, **kw).token_ids
    assert llm(PROMPT, seed=7, **kw).token_ids == first
    assert any(llm(PROMPT, seed=s, **kw).token_ids != first for s in (8, 9, 10))


def test_reported_probabilities_are_the_softmax_of_the_logits(llm):
    events = list(llm.stream(PROMPT, max_new_tokens=3, top_logprobs=5, fast_path=False))
    ids = torch.tensor([events[0].token_ids])
    generated = [e.token_id for e in events[1:]]
    for step, event in enumerate(events[1:]):
        context = torch.cat([ids, torch.tensor([generated[:step]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            probs = torch.softmax(llm.model(context).logits[0, -1].double(), dim=-1)
        top = probs.topk(5)
        assert [t[1] for t in event.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([t[2] for t in event.top]).double(), top.values, atol=1e-5, rtol=1e-4)
        assert event.logprob == pytest.approx(probs[event.token_id].log().item(), abs=1e-4)


def test_processed_distribution_reflects_the_sampling_settings(llm):
    event = [e for e in llm.stream(PROMPT, max_new_tokens=1, temperature=1.0, top_k=3, top_logprobs=5)][-1]
    processed = [p for _, _, p in event.top_processed]
    assert sum(processed[:3]) == pytest.approx(1.0, abs=1e-5) and processed[3:] == [0.0, 0.0]
    assert [t[1] for t in event.top_processed[:3]] == [t[1] for t in event.top[:3]]


def test_events_walk_the_highway(llm):
    events = list(llm.stream(PROMPT, max_new_tokens=4))
    assert [e.phase for e in events] == ["tokenize", "prefill", "decode", "decode", "decode"]
    tokenize, prefill, decode = events[0], events[1], events[2]
    assert tokenize.tokens and len(tokenize.tokens) == len(tokenize.token_ids) == len(PROMPT)
    n = len(PROMPT)
    layers = llm.shape.layers
    assert prefill.shapes["token_ids"] == (1, n) and prefill.shapes["logits"] == (1, 1, 258)
    assert [k for k in prefill.shapes if k.startswith("block")] == [f"block {i}" for i in range(layers)]
    assert decode.shapes["token_ids"] == (1, 1)
    for e in events[1:]:
        assert e.ms > 0 and e.flops > 0 and e.bytes > 0
    assert prefill.flops > decode.flops  # the prompt's tokens all go through the weights


def test_kv_cache_bytes_equal_the_cache_tensors(llm):
    shape = llm.shape
    events = list(llm.stream(PROMPT, max_new_tokens=3, fast_path=False))[1:]  # the plain loop's growing cache
    for step, e in enumerate(events):
        cached_tokens = len(PROMPT) + step  # the newest token is not in the cache yet
        assert e.kv_cache_bytes == cached_tokens * shape.kv_bytes_per_token


def test_without_cache_each_step_reruns_the_sequence(llm):
    events = list(llm.stream(PROMPT, max_new_tokens=4, use_cache=False))[1:]
    lengths = [e.shapes["token_ids"][1] for e in events]
    assert lengths == [len(PROMPT) + i for i in range(4)]  # the staircase: every step longer
    assert all(e.kv_cache_bytes == 0 for e in events)
    assert events[-1].flops > events[1].flops


# ---------------------------------------------------------------------------------------------
# speculative decoding


@pytest.mark.parametrize("mode", ["draft", "prompt-lookup", "self"])
def test_every_speculative_mode_equals_plain_greedy(llm, tokenizer, mode):
    family = type(llm.model).__name__
    draft = None
    if mode == "draft":
        draft = TextGenerationPipeline(tiny_llm("llama", seed=1, layers=1), tokenizer)
    elif mode == "self":
        draft = 1
    plain = llm(PROMPT, max_new_tokens=16)
    spec = llm(PROMPT, max_new_tokens=16, speculative=mode, draft=draft, num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids, family
    assert spec.text == plain.text
    assert 0.0 <= spec.acceptance_rate <= 1.0 and spec.tokens_per_target_forward >= 1.0
    rounds = [e for e in spec.steps if e.drafted is not None]
    assert rounds and all(e.ms > 0 for e in rounds)


def test_prompt_lookup_accepts_repeated_text(tokenizer):
    """A model that copies (here: the same model whose greedy output repeats) accepts its n-gram drafts."""
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    plain = llm(PROMPT, max_new_tokens=24)
    repeated = PROMPT + plain.text  # greedy on this text continues with a text that already occurred
    spec = llm(repeated + repeated, max_new_tokens=8, speculative="prompt-lookup", num_draft_tokens=4)
    assert spec.token_ids == llm(repeated + repeated, max_new_tokens=8).token_ids


def test_self_draft_shares_the_weights(llm):
    draft = self_draft_model(llm.model, 1)
    assert draft.config.num_hidden_layers == 1
    assert llm.model.config.get_text_config().num_hidden_layers == 2  # the target is untouched
    draft_params = {id(p) for p in draft.parameters()}
    assert draft_params < {id(p) for p in llm.model.parameters()}


def test_speculative_sampling_keeps_the_target_distribution(tokenizer):
    """Three tokens sampled with a disagreeing draft follow the target's exact joint distribution
    (a chi-square test), while the draft's own distribution would fail the same test."""
    target = TextGenerationPipeline(tiny_llm("llama", seed=0), tokenizer)
    # the draft: the target with a perturbed head, so it agrees sometimes, as real drafts do
    draft_model = tiny_llm("llama", seed=0)
    with torch.no_grad():
        head = draft_model.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * head.std() * 0.5)
    draft = TextGenerationPipeline(draft_model, tokenizer)
    settings = SamplingSettings(temperature=1.0, top_k=3)
    prompt_ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])

    def exact_joint(model, length=3):
        """P(t0, t1, t2) by enumerating the top-3 tokens at each position."""
        joint = {(): 1.0}
        for _ in range(length):
            grown = {}
            for prefix, p in joint.items():
                ids = torch.cat([prompt_ids, torch.tensor([list(prefix)], dtype=torch.long)], 1)
                with torch.no_grad():
                    scores = settings.processors()(ids, model(ids).logits[:, -1].float())
                probs = torch.softmax(scores.double(), -1)[0]
                for t in probs.nonzero().flatten().tolist():
                    grown[prefix + (t,)] = p * probs[t].item()
            joint = grown
        return joint

    target_p = exact_joint(target.model)
    draft_p = exact_joint(draft.model)
    runs = 800
    counts, accepted = {}, []
    for seed in range(runs):
        out = target(PROMPT, max_new_tokens=3, temperature=1.0, top_k=3, seed=seed, speculative="draft", draft=draft,
                     num_draft_tokens=2)
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
        accepted.append(out.acceptance_rate)
    # both branches of the rule ran many times: drafts kept, and drafts rejected and resampled
    assert 0.2 < sum(accepted) / runs < 0.9
    assert set(counts) <= set(target_p)  # never a token the target's top-3 excludes

    # cells expected fewer than 5 times are pooled, as the chi-square approximation needs
    common = [k for k, p in target_p.items() if p * runs >= 5]
    cells = [(target_p[k], counts.get(k, 0), draft_p.get(k, 0.0)) for k in common]
    rest = (1 - sum(p for p, _, _ in cells), runs - sum(c for _, c, _ in cells), 1 - sum(q for _, _, q in cells))
    if rest[0] * runs >= 1:
        cells.append(rest)
    chi2 = sum((c - p * runs) ** 2 / (p * runs) for p, c, _ in cells)
    draft_chi2 = sum((q * runs - p * runs) ** 2 / (p * runs) for p, _, q in cells)  # what sampling the draft would give
    critical = {d: c for d, c in [(5, 20.5), (10, 29.6), (15, 37.7), (20, 45.3), (25, 52.6), (30, 59.7)]}
    df = len(cells) - 1
    limit = critical[min(d for d in critical if d >= df)]  # 99.9 % quantile (rounded up df)
    assert chi2 < limit, (chi2, df)
    assert draft_chi2 > 3 * limit, (draft_chi2, df)


# ---------------------------------------------------------------------------------------------
# stopping


def test_stops_at_end_of_sequence(tokenizer):
    model = tiny_llm("llama")
    llm = TextGenerationPipeline(model, tokenizer)
    greedy = llm(PROMPT, max_new_tokens=6).token_ids
    llm.eos_token_ids = {greedy[2]}
    out = llm(PROMPT, max_new_tokens=6)
    assert out.token_ids == greedy[:3] and out.finish_reason == "eos"


def test_stops_at_a_stop_string_and_holds_it_back(llm):
    full = llm(PROMPT, max_new_tokens=30)
    # random weights emit random bytes: take the stop string from two whole characters
    start = next(i for i in range(1, len(full.text) - 1) if "\ufffd" not in full.text[i : i + 2])
    stop = full.text[start : start + 2]
    out = llm(PROMPT, max_new_tokens=30, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]
    streamed = "".join(e.text for e in llm.stream(PROMPT, max_new_tokens=30, stop=stop) if e.text)
    assert stop not in streamed


def test_length_limit(llm):
    out = llm(PROMPT, max_new_tokens=5)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_closing_the_stream_stops_between_steps_and_the_pipeline_stays_usable(llm):
    stream = llm.stream(PROMPT, max_new_tokens=50)
    taken = [next(stream) for _ in range(4)]
    stream.close()
    assert [e.phase for e in taken] == ["tokenize", "prefill", "decode", "decode"]
    assert len(llm(PROMPT, max_new_tokens=3).token_ids) == 3


def test_stop_event_ends_generation(llm):
    stop = threading.Event()
    events = []
    for event in llm.stream(PROMPT, max_new_tokens=50, stop_event=stop):
        events.append(event)
        if len(events) == 4:
            stop.set()
    assert len(events) == 4


def test_chat_prompt_goes_through_the_template(llm):
    first = next(llm.stream("hi", chat=True, max_new_tokens=1))
    assert "".join(first.tokens).replace("Ġ", " ").replace("Ċ", "\n") == "<|user|>hi\n<|assistant|>"


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   "), "prompt is empty"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=10**9), "exceeds the model's context"),
        (dict(prompt="x" * 250, max_new_tokens=10), "exceeds the model's context"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(speculative="magic"), "unknown speculative mode"),
        (dict(speculative="self", use_cache=False), "needs use_cache=True"),
        (dict(speculative="draft"), "needs draft="),
    ],
)
def test_bad_input_gives_a_clear_error_and_the_pipeline_stays_usable(llm, kwargs, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(ValueError, match=message):
        list(llm.stream(prompt, **kwargs))
    assert len(llm(PROMPT, max_new_tokens=2).token_ids) == 2


# ---------------------------------------------------------------------------------------------
# loading and the command line


@pytest.fixture(scope="module")
def saved_llm(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llm("llama").save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_from_pretrained_loads_a_local_safetensors_folder(saved_llm, tokenizer):
    loaded = TextGenerationPipeline.from_pretrained(str(saved_llm), device="cpu")
    assert loaded("The cat", max_new_tokens=5).token_ids == TextGenerationPipeline(tiny_llm("llama"), tokenizer)(
        "The cat", max_new_tokens=5).token_ids


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tokenizer):
    model = tiny_llm("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the old pickle format
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pickle weights"):
        TextGenerationPipeline.from_pretrained(str(tmp_path), device="cpu")
    assert TextGenerationPipeline.from_pretrained(str(tmp_path), device="cpu", allow_pickle=True)("hi", max_new_tokens=2)


def test_a_corrupt_weights_file_and_an_unknown_model_give_clear_errors(saved_llm, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_llm, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not load the language model"):
        TextGenerationPipeline.from_pretrained(str(broken), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load the language model 'nobody/no-such-model'"):
        TextGenerationPipeline.from_pretrained("nobody/no-such-model", device="cpu")


def test_a_prompt_with_a_lone_surrogate_is_refused_clearly(llm):
    with pytest.raises(ValueError, match="lone surrogate"):
        llm("abc \ud800", max_new_tokens=2)


def test_a_truncated_gguf_file_is_a_load_error(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**6, 10**6))  # a header promising a million tensors
    with pytest.raises(LoadError, match="could not load the language model"):
        TextGenerationPipeline.from_pretrained(str(gguf), device="cpu")


def test_studio_generate_prints_tokens_and_alternatives(saved_llm, capsys):
    from studio.cli import main

    assert main(["generate", "The cat", "--model", str(saved_llm), "--max-new-tokens", "3", "--show-probs", "2",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out.count("decode") == 2 and "prefill 0" in out.out
    assert "tok/s" in out.err
    assert main(["generate", "", "--model", str(saved_llm), "--device", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
