"""LoRA adapters: small low-rank weights added to a model's linear layers, switchable per call.

    name = llm.load_adapter("path/to/peft-folder")           # adapter_config.json + adapter_model.safetensors
    llm("The cat sat", adapter=name)                          # with it; adapter=None: the base model
    name = img.load_adapter("path/to/lora-folder")           # what diffusers' save_lora_weights writes
    img("red apple", adapter=name, adapter_scale=0.8)

A LoRA adapter changes a layer y = W x into y = W x + scale · B (A x), with A [rank, in] and
B [out, rank] learned (for a convolution, A a convolution like the layer's and B a 1x1 one) and
scale = lora_alpha / rank: a rank-r correction to W that costs
r · (in + out) numbers instead of in · out. Here the correction runs *unmerged*: a forward hook on
each target layer adds scale · B (A x) to its output while a call that asked for the adapter runs,
so adapters switch per call, the base weights are never touched, and precision wrappers
(backends.apply_precision) stay in place underneath. `merged()` folds scale · B A into the weights
instead, for the benchmark's comparison of the two.

Two file formats, the ones the stock libraries write:
    peft (LLMs)       adapter_config.json (r, lora_alpha, target_modules, rank/alpha patterns) and
                      adapter_model.safetensors, keys "base_model.model.<module>.lora_A.weight"
    diffusers         pytorch_lora_weights.safetensors, keys "unet.<module>.lora_A.weight" and
                      "text_encoder.<module>...", rank and alpha in its "lora_adapter_metadata"
                      (alpha = rank where a file says nothing, as diffusers assumes)
Pickles (adapter_model.bin) are refused, as the lanes refuse pickled weights.

Depends on torch, safetensors and studio.loading; never on a pipeline, the UI or Gradio.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from studio.loading import LoadError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraLayer:
    component: str  # "model" (an LLM), or "unet" / "transformer" / "text_encoder" (a diffusion pipeline)
    module: str  # the layer's qualified name within its component
    down: torch.Tensor  # A: [rank, in]
    up: torch.Tensor  # B: [out, rank]
    scale: float  # lora_alpha / rank


@dataclass(frozen=True)
class Adapter:
    name: str
    source: str  # the folder it was read from
    layers: tuple[LoraLayer, ...]

    @property
    def parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.down.nbytes + layer.up.nbytes for layer in self.layers)

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.down.shape[0] for layer in self.layers})

    def by_target(self, components: dict[str, nn.Module]) -> list[dict]:
        """Per kind of target layer (q_proj, to_k, ...): how many layers, the adapter's parameters
        and bytes there, and the base weights' bytes of those layers."""
        rows: dict[tuple[str, str], dict] = {}
        for layer in self.layers:
            parts = layer.module.split(".")
            target = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]  # "q_proj", "to_out.0"
            row = rows.setdefault((layer.component, target), {"component": layer.component, "target": target,
                                                              "layers": 0, "parameters": 0, "bytes": 0, "base_bytes": 0})
            base = components[layer.component].get_submodule(layer.module)
            row["layers"] += 1
            row["parameters"] += layer.down.numel() + layer.up.numel()
            row["bytes"] += layer.down.nbytes + layer.up.nbytes
            row["base_bytes"] += base.weight.nbytes
        return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Reading the two formats


def read_peft(path: str | Path, model: nn.Module, name: str) -> Adapter:
    """A peft LoRA folder for the causal LM `model`, checked against it."""
    folder = Path(path)
    _check_folder(folder, expected=PEFT_CONFIG, other=DIFFUSERS_WEIGHTS,
                  other_kind="a diffusers LoRA (for the diffusion lane): load it with the diffusion pipeline's "
                             "load_adapter")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise LoadError(f"{folder / PEFT_CONFIG} is not readable JSON ({error}); restore the adapter folder") from error
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise LoadError(f"{folder} holds a {config.get('peft_type', 'LoRA')}{' (DoRA)' if config.get('use_dora') else ''} "
                        "adapter; the studio runs plain LoRA adapters")
    tensors = _read_weights(folder / PEFT_WEIGHTS)
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", config.get("r", 8)))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    root = "base_model.model."

    def scale(module: str) -> float:
        r = next((v for k, v in rank_pattern.items() if module.endswith(k)), rank)
        a = next((v for k, v in alpha_pattern.items() if module.endswith(k)), alpha)
        return a / (r ** 0.5 if config.get("use_rslora") else r)

    pairs = _pairs(tensors, strip=root)
    layers = tuple(LoraLayer("model", module, down, up, scale(module)) for module, (down, up) in pairs.items())
    return _checked(Adapter(name, str(folder), layers), {"model": model})


def read_diffusers(path: str | Path, components: dict[str, nn.Module], name: str) -> Adapter:
    """A diffusers LoRA file (or the folder holding it) for a pipeline's `components`."""
    path = Path(path)
    file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    if path.is_dir():
        _check_folder(path, expected=DIFFUSERS_WEIGHTS, other=PEFT_CONFIG,
                      other_kind="a peft adapter for a language model: load it with the LLM pipeline's load_adapter")
    tensors = _read_weights(file)
    try:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    except (OSError, ValueError, SafetensorError):
        metadata = {}
    layers = []
    for key, (down, up) in _pairs(tensors, strip="").items():
        component, _, module = key.partition(".")
        rank = down.shape[0]
        alpha = metadata.get(f"{component}.lora_alpha", rank)
        alpha = (metadata.get(f"{component}.alpha_pattern") or {}).get(module, alpha)
        layers.append(LoraLayer(component, module, down, up, float(alpha) / rank))
    return _checked(Adapter(name, str(path), tuple(layers)), components)


def _check_folder(folder: Path, expected: str, other: str, other_kind: str) -> None:
    if not folder.is_dir():
        raise LoadError(f"no adapter at {folder}: give a folder holding {expected}, or a shipped adapter's name")
    if (folder / expected).is_file():
        return
    if (folder / other).is_file():
        raise LoadError(f"{folder} holds {other}: it is {other_kind}")
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise LoadError(f"{folder} holds only pickle weights ({', '.join(pickles[:2])}), which can run code when "
                        "loaded; convert them to safetensors")
    raise LoadError(f"{folder} has no {expected}: it is not an adapter folder this lane reads")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise LoadError(f"{file} is missing; restore the adapter's files")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise LoadError(f"{file} is damaged ({error}); restore the adapter's files") from error


def _pairs(tensors: dict[str, torch.Tensor], strip: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from "...<module>.lora_A.weight" / "lora_B.weight" keys (also the older
    "lora.down" / "lora.up" spelling)."""
    downs, ups = {}, {}
    for key, tensor in tensors.items():
        key = key.removeprefix(strip)
        for marker, store in ((".lora_A.weight", downs), (".lora.down.weight", downs),
                              (".lora_B.weight", ups), (".lora.up.weight", ups)):
            if key.endswith(marker):
                store[key[: -len(marker)]] = tensor
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise LoadError(f"the adapter's weights are incomplete: {unpaired[0]} has only one of its two LoRA matrices")
    if not downs:
        raise LoadError("the adapter file holds no LoRA weights (no lora_A / lora_B tensors)")
    return {module: (downs[module], ups[module]) for module in sorted(downs)}


def _checked(adapter: Adapter, components: dict[str, nn.Module]) -> Adapter:
    """The adapter, if every layer it names exists in `components` as a linear layer of the shape
    its matrices need; else a LoadError saying what does not fit."""
    for layer in adapter.layers:
        owner = components.get(layer.component)
        if owner is None:
            raise LoadError(f"adapter {adapter.name!r} has weights for a {layer.component!r}, which this model does not "
                            f"have (it has {', '.join(components)})")
        try:
            module = owner.get_submodule(layer.module)
        except AttributeError:
            raise LoadError(f"adapter {adapter.name!r} targets {layer.component}.{layer.module}, which this model does "
                            f"not have: it was trained for another architecture") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
            raise LoadError(f"adapter {adapter.name!r} targets {layer.module}, which is neither a linear nor a 2-D "
                            "convolution layer; the studio runs LoRA on those two only")
        rank = layer.down.shape[0]
        if weight.dim() == 4:  # a convolution: A is a convolution of the layer's kernel, B a 1x1 one
            out_features, in_features, *kernel = weight.shape
            expected_down, expected_up = (rank, in_features, *kernel), (out_features, rank, 1, 1)
        else:  # GPT-2's Conv1D stores its weight transposed, [in, out]; nn.Linear's is [out, in]
            in_features, out_features = weight.shape if type(module).__name__ == "Conv1D" else weight.shape[::-1]
            expected_down, expected_up = (rank, in_features), (out_features, rank)
        if layer.down.shape != expected_down or layer.up.shape != expected_up:
            raise LoadError(
                f"adapter {adapter.name!r} does not fit {layer.module}: its matrices are {tuple(layer.down.shape)} and "
                f"{tuple(layer.up.shape)}, the layer needs {expected_down} and {expected_up}: "
                "a base model of another size, or a damaged adapter"
            )
    return adapter


# ---------------------------------------------------------------------------------------------
# Running with one


@contextlib.contextmanager
def attached(components: dict[str, nn.Module], adapter: Adapter | None, scale: float = 1.0):
    """Run the enclosed calls with the adapter's low-rank terms added, unmerged (None: nothing).
    The hooks are removed on the way out, so the next call sees the base model again."""
    if adapter is None:
        yield
        return
    handles = []
    try:
        for layer in adapter.layers:
            module = components[layer.component].get_submodule(layer.module)
            device, dtype = module.weight.device, module.weight.dtype
            down, up = layer.down.to(device, dtype), layer.up.to(device, dtype)
            hook = _conv_lora_hook if isinstance(module, nn.Conv2d) else _lora_hook
            handles.append(module.register_forward_hook(hook(down, up, layer.scale * scale)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(down: torch.Tensor, up: torch.Tensor, scale: float):
    def add_low_rank(module, inputs, output):
        x = inputs[0]
        return output + scale * F.linear(F.linear(x.to(down.dtype), down), up).to(output.dtype)

    return add_low_rank


def _conv_lora_hook(down: torch.Tensor, up: torch.Tensor, scale: float):
    def add_low_rank(module, inputs, output):
        x = inputs[0].to(down.dtype)
        low = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
        return output + scale * F.conv2d(low, up).to(output.dtype)

    return add_low_rank


@contextlib.contextmanager
def merged(components: dict[str, nn.Module], adapter: Adapter, scale: float = 1.0):
    """Fold scale · B A into the target weights for the enclosed calls, then put the original
    weights back exactly (they are kept aside, not recomputed). For models in their own dtype: a
    precision wrapper's converted copy of a weight would not see the change."""
    kept = []
    try:
        with torch.no_grad():
            for layer in adapter.layers:
                weight = components[layer.component].get_submodule(layer.module).weight
                kept.append((weight, weight.detach().clone()))
                up, down = layer.up.to(torch.float32), layer.down.to(torch.float32)
                # a convolution's B is 1x1: merging multiplies its [out, rank] matrix into A's kernels
                delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape) * (layer.scale * scale)
                weight.add_(delta.to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in kept:
                weight.copy_(original)


def random_adapter(name: str, components: dict[str, nn.Module], targets: tuple[str, ...], rank: int = 8,
                   seed: int = 0) -> Adapter:
    """A LoRA of `rank` on every linear layer whose name ends in one of `targets`, with random
    weights (both matrices non-zero, scaled small): for measuring what an adapter of that shape
    costs, where what it learned does not matter."""
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for component, model in components.items():
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not module_name.endswith(targets) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            out_features, in_features = weight.shape
            down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            up = torch.randn(out_features, rank, generator=generator) * 0.01
            layers.append(LoraLayer(component, module_name, down.to(weight.dtype), up.to(weight.dtype), 1.0))
    if not layers:
        raise ValueError(f"no linear layer ends in {', '.join(targets)}")
    return Adapter(name, "random weights", tuple(layers))


# ---------------------------------------------------------------------------------------------
# What an adapter costs against its base (`studio inspect ADAPTER`, the app's Inspector)


def is_adapter(source: str) -> bool:
    """Whether `source` names an adapter: a shipped adapter, or a folder in either format."""
    from studio import assets

    shipped = assets.load_manifest().get(source)
    if shipped is not None:
        return shipped.kind.endswith("-adapter")
    folder = Path(source)
    return (folder / PEFT_CONFIG).is_file() or (folder / DIFFUSERS_WEIGHTS).is_file()


def inspect_adapter(source: str, base: str | None = None) -> dict:
    """An adapter's parameters and bytes against its base model's, per kind of target layer. The
    base is built on the meta device from its config (no weights are read): a shipped adapter
    names its base; for a folder, pass `base` (a shipped name, reference name or config)."""
    from studio import assets, inspector

    shipped = assets.load_manifest().get(source)
    base = base or (shipped.base if shipped is not None else None)
    if base is None:
        raise ValueError(f"{source} does not say which model it adapts: pass the base model (--base)")
    path = assets.resolve(source) if shipped is not None else source
    loaded = inspector.load_config(base)
    if loaded.kind == "llm":
        components = {"model": inspector.llm_on_meta(loaded.config, "fp32")}
        adapter = read_peft(path, components["model"], source)
    else:
        denoiser = inspector.diffusers_on_meta(loaded.config, "fp32")
        components = {"unet" if "UNet" in type(denoiser).__name__ else "transformer": denoiser}
        if "text_encoder" in loaded.components:
            components["text_encoder"] = inspector.text_encoder_on_meta(loaded.components["text_encoder"], "fp32")
        adapter = read_diffusers(path, components, source)
    base_parameters = sum(p.numel() for model in components.values() for p in model.parameters())
    return {
        "adapter": source, "base": base, "ranks": adapter.ranks, "layers": len(adapter.layers),
        "parameters": adapter.parameters, "bytes": adapter.bytes, "base_parameters": base_parameters,
        "base_bytes": sum(p.nbytes for model in components.values() for p in model.parameters()),
        "targets": adapter.by_target(components),
    }


def format_adapter(report: dict) -> str:
    """`inspect_adapter`'s report as the terminal shows it."""
    from studio.inspector import human_bytes, human_count

    lines = [
        f"{report['adapter']}: a LoRA adapter (rank {', '.join(map(str, report['ranks']))}) for {report['base']}",
        f"  {human_count(report['parameters'])} parameters, {human_bytes(report['bytes'])} "
        f"({report['parameters'] / report['base_parameters']:.2%} of the base's {human_count(report['base_parameters'])}"
        f" in the components it touches, {human_bytes(report['base_bytes'])} in fp32)",
        "",
        f"  {'component':<13} {'target':<14} {'layers':>6} {'parameters':>11} {'bytes':>10} {'base layers':>12} {'share':>7}",
    ]
    for row in report["targets"]:
        lines.append(
            f"  {row['component']:<13} {row['target']:<14} {row['layers']:>6} {human_count(row['parameters']):>11} "
            f"{human_bytes(row['bytes']):>10} {human_bytes(row['base_bytes']):>12} {row['bytes'] / row['base_bytes']:>7.1%}"
        )
    return "\n".join(lines)
