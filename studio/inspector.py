"""The inspector: what a model's config predicts before it runs.

`analyse(config)` turns a config.json (an LLM's, or a diffusers pipeline folder's) into parameters, weight and KV-cache memory, the work and traffic of a prefill,
a decode token, a denoising step and a VAE decode, and the time and bound each known GPU would
give them (`studio.profiling.roofline`). It builds the model on the meta device, where tensors
have shapes but no storage: counting its parameters is exact and costs no memory, and a forward
pass there counts FLOPs without computing anything. `reference_configs()` lists the shipped
configs in assets/configs/ (architecture fields only, no weights).

Depends on torch, studio.cost and studio.profiling; transformers and diffusers are imported when a config is
analysed (to build the model on the meta device). Never imports a pipeline or the UI.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.cost import decoder_shape, decoder_step_cost, tensor_bytes

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"
TINY = "tiny"  # assets/configs/tiny/: toy shapes for smoke tests, not real architectures

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT_TOKENS = 128  # the prompt of the LLM workloads unless told otherwise (as in shared/ANCHORS.md)
TEXT_TOKENS = {"unet": 77, "transformer": 120}  # CLIP's fixed 77; PixArt's T5 prompt length


def reference_configs(tiny: bool = False) -> dict[str, Path]:
    """The shipped reference configs by name -> their folder (a transformers config.json, or a
    diffusers pipeline folder with model_index.json). tiny=True adds the toy shapes of the tests."""
    folders = sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name != TINY) if CONFIGS.is_dir() else []
    if tiny and (CONFIGS / TINY).is_dir():
        folders += sorted(p for p in (CONFIGS / TINY).iterdir() if p.is_dir())
    return {p.name: p for p in folders if (p / "config.json").is_file() or (p / "model_index.json").is_file()}


def find_reference(name: str) -> Path | None:
    """A reference config by name, forgiving case and spelling: "Llama-3.2-1B", "DiT-XL/2" and
    "SD-1.5 UNet" all work; a unique prefix is enough."""
    def normal(text: str) -> str:
        return re.sub(r"[\s_/]+", "-", text.strip().lower())

    configs = reference_configs(tiny=True)
    wanted = normal(str(name))
    by_normal = {normal(n): p for n, p in configs.items()}
    if wanted in by_normal:
        return by_normal[wanted]
    starts = [p for n, p in by_normal.items() if n.startswith(wanted)]
    return starts[0] if len(starts) == 1 else None


@dataclass
class ModelConfig:
    """A model's configuration as the inspector reads it."""

    name: str
    kind: str  # "llm" | "diffusion"
    config: dict  # the LLM's config, or the diffusion denoiser's (UNet or transformer)
    components: dict[str, dict] = field(default_factory=dict)  # diffusion: vae, text_encoder(s), scheduler configs
    pipeline: str | None = None  # diffusion: the diffusers pipeline class of model_index.json
    folder: Path | None = None


def load_config(source, name: str | None = None) -> ModelConfig:
    """Read a config from a dict, a config.json or model_index.json file or folder, a reference
    name (see reference_configs), a shipped model name or, while online, a hub id."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, dict):
        return _config_from_dict(dict(source), name or source.get("_name_or_path") or "config")
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        reference = find_reference(text)
        if reference is not None:
            return _config_from_folder(reference, name or reference.name)
        from studio import assets  # a shipped model resolves to its local folder

        if text in assets.list_models():
            return _config_from_folder(Path(assets.resolve(text)), name or text)
        return _config_from_hub(text, name)
    if path.is_file():
        if path.name == "model_index.json":
            return _config_from_folder(path.parent, name or path.parent.name)
        return _config_from_dict(json.loads(path.read_text()), name or path.parent.name or path.stem)
    return _config_from_folder(path, name or path.name)


def _config_from_folder(folder: Path, name: str) -> ModelConfig:
    index = folder / "model_index.json"
    if index.is_file():
        pipeline = json.loads(index.read_text())
        denoiser = "unet" if "unet" in pipeline else "transformer" if "transformer" in pipeline else None
        if denoiser is None:
            raise ValueError(f"{index} names neither a unet nor a transformer: not a latent diffusion pipeline")
        components = {}
        for part in ("vae", "text_encoder", "text_encoder_2", "scheduler"):
            for file in ("config.json", "scheduler_config.json"):
                if (folder / part / file).is_file():
                    components[part] = json.loads((folder / part / file).read_text())
        config = json.loads((folder / denoiser / "config.json").read_text())
        return ModelConfig(name, "diffusion", config, components, pipeline.get("_class_name"), folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has neither a config.json nor a model_index.json")
    loaded = _config_from_dict(json.loads((folder / "config.json").read_text()), name)
    loaded.folder = folder
    return loaded


def _config_from_dict(config: dict, name: str) -> ModelConfig:
    if "model_type" in config:
        return ModelConfig(name, "llm", config)
    if "_class_name" in config:
        if config["_class_name"].endswith("Pipeline"):
            raise ValueError("a model_index.json alone does not hold the model shapes: give the pipeline folder")
        return ModelConfig(name, "diffusion", config)
    raise ValueError(
        f"{name}: not a transformers config (no 'model_type') nor a diffusers model config (no '_class_name')"
    )


def _config_from_hub(repo: str, name: str | None) -> ModelConfig:
    known = ", ".join(reference_configs())
    if repo.count("/") != 1:
        raise ValueError(f"{repo!r} is not a reference config ({known}), a shipped model, a local path or a hub id")
    try:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(repo, "model_index.json"))
        except Exception:  # not a diffusers pipeline: an LLM's config.json
            return _config_from_dict(json.loads(Path(hf_hub_download(repo, "config.json")).read_text()), name or repo)
        for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
            try:
                hf_hub_download(repo, f"{part}/config.json")
            except Exception:
                pass
        hf_hub_download(repo, "scheduler/scheduler_config.json")
        return _config_from_folder(index.parent, name or repo)
    except ValueError:
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not fetch the config of {repo!r} ({first}); use a reference config ({known}), a local "
            "config.json or folder, or a hub id while online"
        ) from error


@dataclass(frozen=True)
class Workload:
    """One step's work: FLOPs computed and bytes moved to and from device memory."""

    name: str  # "prefill" | "decode" | "denoise step" | "vae decode"
    detail: str  # what exactly, e.g. "128 prompt tokens, batch 1"
    flops: int
    bytes: int
    tokens: int = 1  # tokens this step produces or reads (prefill: the prompt), for per-token figures

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


@dataclass(frozen=True)
class Prediction:
    """What the roofline says a workload takes on one device."""

    device: str
    workload: str
    dtype: str  # the matmul ceiling used (a device without the analysis dtype falls back to fp16/fp32)
    ms: float  # max(FLOPs / peak, bytes / bandwidth): the fastest the device can do it
    bound: str  # "memory" | "compute"
    intensity: float
    ridge: float
    per_second: float  # tokens/s (prefill, decode) or steps/s


@dataclass
class Analysis:
    """What a config predicts: sizes, memory, the work of each step and its time on each device."""

    name: str
    kind: str  # "llm" | "diffusion"
    architecture: str  # the model class
    dtype: str  # the dtype the bytes, work and times assume
    parameters: int  # every parameter once (tied weights once), as model.num_parameters() counts
    weight_bytes: dict[str, int]  # dtype -> bytes of all parameters in it; int8/fp8: Linear weights in 1 byte, the rest in bf16
    config: dict
    # LLM
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    context_length: int | None = None
    prompt_tokens: int | None = None
    kv_bytes_per_token: int | None = None  # at `dtype`: what the KV cache grows by per token
    kv_bytes_full_context: int | None = None
    # diffusion
    image_size: tuple[int, int] | None = None
    latent_shape: tuple[int, ...] | None = None
    components: dict[str, int] = field(default_factory=dict)  # parameters of the pipeline's other models
    component_bytes: dict[str, int] = field(default_factory=dict)  # their bytes at `dtype`
    # both
    attention_scores_bytes: int = 0  # the largest score matrix eager attention materialises in these steps
    attention_scores_shape: tuple[int, ...] | None = None  # (batch, heads, q_len, kv_len) of that matrix
    workloads: list[Workload] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(f"{self.name} has no workload {name!r}; it has {', '.join(w.name for w in self.workloads)}")

    def predicted(self, device: str, workload: str) -> Prediction:
        for p in self.predictions:
            if p.device == device and p.workload == workload:
                return p
        raise KeyError(f"no prediction of {workload!r} on {device!r}")

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(p.device for p in self.predictions))


def analyse(
    source,
    device=None,
    dtype: str | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    batch: int = 1,
    image_size: int | tuple[int, int] | None = None,
    guidance: bool = True,
) -> Analysis:
    """Analyse a config (dict, file, folder, reference name, shipped name or hub id).

    device: None for every known GPU (studio.profiling.known_devices()); a name or part of one
    ("h100" -> H100 SXM and H100 PCIe); "cpu"/"cuda" to probe this machine; or a Ceilings, or a
    list of these. dtype: "bf16" (LLMs) or "fp16" (diffusion) by default, as the lanes load them
    on a GPU. prompt_tokens: the LLM's prefill length, decode is the token after it. image_size:
    the diffusion lane's (default: the model's own); guidance: a CFG step runs a batch of two.
    """
    loaded = load_config(source)
    if loaded.kind == "llm":
        analysis = _analyse_llm(loaded, dtype or "bf16", prompt_tokens, batch)
    else:
        analysis = _analyse_diffusion(loaded, dtype or "fp16", image_size, guidance)
    analysis.predictions = predict(analysis.workloads, analysis.dtype, device)
    return analysis


def predict(workloads: list[Workload], dtype: str, device=None) -> list[Prediction]:
    """Each workload's roofline time on each device (see `analyse` for `device`)."""
    from studio.profiling import roofline

    predictions = []
    for ceilings in _ceilings(device):
        key = next((k for k in (dtype, "fp16", "fp32") if k in ceilings.peak_flops), None)
        if key is None:
            continue
        for w in workloads:
            point = roofline(w.flops, w.bytes, 0, ceilings, key)
            per_second = 1e3 * w.tokens / point.predicted_ms if point.predicted_ms > 0 else math.inf
            predictions.append(
                Prediction(ceilings.name, w.name, key, point.predicted_ms, point.bound, point.intensity, point.ridge, per_second)
            )
    return predictions


def _ceilings(device) -> list:
    from studio.profiling import DATASHEET, Ceilings, ceilings_for, known_devices

    if device is None:
        return [DATASHEET[name] for name in known_devices()]
    if isinstance(device, Ceilings):
        return [device]
    if isinstance(device, (list, tuple)):
        return [c for d in device for c in _ceilings(d)]
    if isinstance(device, torch.device) or str(device).split(":")[0] in ("cpu", "cuda", "mps", "xpu"):
        return [ceilings_for(device)]
    wanted = re.sub(r"[\s_-]+", "", str(device).lower())
    matches = [DATASHEET[n] for n in known_devices() if wanted in re.sub(r"[\s_-]+", "", n.lower())]
    if not matches:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(known_devices())}, or cpu / cuda to probe this machine")
    return matches


# --- LLMs ------------------------------------------------------------------------------------


def _quiet_transformers():
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # config sanity warnings about token ids are noise here
    return lambda: transformers_logging.set_verbosity(level)


def llm_on_meta(config: dict, dtype: str = "bf16"):
    """The causal LM of a transformers config, built on the meta device: every parameter with its
    shape and dtype, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    restore = _quiet_transformers()
    try:
        fields = dict(config)
        model_type = fields.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES.get(dtype, torch.bfloat16))
    except (KeyError, ValueError) as error:
        raise ValueError(f"cannot build a causal LM from this config ({error})") from error
    finally:
        restore()


def _analyse_llm(loaded: ModelConfig, dtype: str, prompt_tokens: int, batch: int) -> Analysis:
    import dataclasses

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    model = llm_on_meta(loaded.config, dtype if dtype in TORCH_DTYPES else "bf16")
    shape = dataclasses.replace(decoder_shape(model), dtype_bytes=DTYPE_BYTES[dtype])
    text = model.config.get_text_config()
    context = getattr(text, "max_position_embeddings", None)
    if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be a positive integer; got {prompt_tokens!r}")

    prefill = Workload(
        "prefill", f"{prompt_tokens} prompt tokens, batch {batch}",
        *decoder_step_cost(shape, batch, prompt_tokens, prompt_tokens), tokens=batch * prompt_tokens,
    )
    decode = Workload(
        "decode", f"1 token after {prompt_tokens}, batch {batch}",
        *decoder_step_cost(shape, batch, 1, prompt_tokens + 1), tokens=batch,
    )
    kv = shape.kv_bytes_per_token
    return Analysis(
        name=loaded.name, kind="llm", architecture=type(model).__name__, dtype=dtype,
        parameters=model.num_parameters(), weight_bytes=_weight_bytes(model), config=loaded.config,
        layers=shape.layers, hidden=text.hidden_size, heads=shape.heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, vocab=shape.vocab, context_length=context, prompt_tokens=prompt_tokens,
        kv_bytes_per_token=kv, kv_bytes_full_context=kv * context if context else None,
        # eager attention builds one layer's [batch, heads, T, T] scores at a time during prefill
        attention_scores_bytes=batch * shape.heads * prompt_tokens**2 * DTYPE_BYTES[dtype],
        attention_scores_shape=(batch, shape.heads, prompt_tokens, prompt_tokens),
        workloads=[prefill, decode],
    )


def _weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter in each dtype. A parameter the model keeps in float32 whatever
    the dtype (`_keep_in_fp32_modules`) stays 4 bytes. int8/fp8: the Linear weights in 1 byte (as
    studio.backends' weight-only int8 and fp8 store them; their per-channel scales are left out),
    everything else in bf16."""
    built = next(model.parameters()).dtype
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    out = {}
    for key, size in DTYPE_BYTES.items():
        total = 0
        for p in model.parameters():
            if p.dtype != built:  # kept in its own dtype
                total += p.numel() * p.element_size()
            elif size == 1 and id(p) not in linear:
                total += p.numel() * 2
            else:
                total += p.numel() * size
        out[key] = total
    return out


def decoder_activation_bytes(analysis: Analysis, q_len: int, kv_len: int, eager: bool = False, logits_len: int = 1) -> int:
    """A rough count of the activations one LLM forward holds at its peak, for memory budgets:
    the hidden states of every layer (the LLM lane asks for them, to show the shapes), one MLP's
    intermediate tensors, the float32 logits, and with eager attention one layer's float32 scores."""
    config = analysis.config
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * analysis.hidden
    size = DTYPE_BYTES[analysis.dtype]
    hidden_states = (analysis.layers + 1) * q_len * analysis.hidden * size
    mlp = 2 * q_len * intermediate * size
    logits = 2 * logits_len * analysis.vocab * 4  # logits, then their float32 log-softmax
    scores = analysis.heads * q_len * kv_len * 4 if eager else 0
    return hidden_states + mlp + logits + scores


# --- diffusion -------------------------------------------------------------------------------

# diffusers loads these published class names as the newer, specialised classes
_REMAPPED = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel",
             ("Transformer2DModel", "ada_norm_single"): "PixArtTransformer2DModel"}


def diffusers_model_class(config: dict):
    import diffusers

    name = config.get("_class_name")
    name = _REMAPPED.get((name, config.get("norm_type")), name)
    cls = getattr(diffusers, str(name), None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"{name!r} is not a diffusers model class")
    return cls


def diffusers_on_meta(config: dict, dtype: str = "fp16"):
    """A diffusers model built on the meta device from its config."""
    from diffusers.utils import logging as diffusers_logging

    cls = diffusers_model_class(config)
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice on casting with .to() is about loading weights
    try:
        with torch.device("meta"):
            model = cls.from_config(fields)
        return model.to(TORCH_DTYPES.get(dtype, torch.float16)).eval()
    finally:
        diffusers_logging.set_verbosity(level)


def text_encoder_on_meta(config: dict, dtype: str = "fp16"):
    """A transformers text encoder (CLIP, T5 encoder) built on the meta device from its config."""
    import transformers
    from transformers import AutoConfig

    architecture = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, str(architecture), None)
    if cls is None:
        raise ValueError(f"unknown text encoder architecture {architecture!r}")
    restore = _quiet_transformers()
    try:
        fields = dict(config)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            return cls._from_config(hf_config, dtype=TORCH_DTYPES.get(dtype, torch.float16))
    finally:
        restore()


def denoiser_inputs(model, batch: int, latent_hw: tuple[int, int], device="meta", text_tokens: int | None = None) -> dict:
    """Keyword arguments of one denoiser call on a batch of latents, as the diffusion lane makes them."""
    from diffusers import UNet2DConditionModel

    config = model.config
    dtype = next(model.parameters()).dtype
    h, w = latent_hw
    make = dict(device=device, dtype=dtype)
    sample = torch.zeros(batch, config.in_channels, h, w, **make)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    if isinstance(model, UNet2DConditionModel):
        cross = config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        kwargs = dict(sample=sample, timestep=timestep,
                      encoder_hidden_states=torch.zeros(batch, text_tokens or TEXT_TOKENS["unet"], cross, **make))
        if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size conditioning
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, **make),
                                           "time_ids": torch.zeros(batch, 6, **make)}
        return kwargs
    if getattr(config, "caption_channels", None):  # PixArt: T5 text with a padding mask
        tokens = text_tokens or TEXT_TOKENS["transformer"]
        sizes = {"resolution": None, "aspect_ratio": None}
        if config.sample_size == 128:  # PixArt-alpha at 1024 px is conditioned on size and aspect ratio
            sizes = {"resolution": torch.full((batch, 2), 1024.0, **make), "aspect_ratio": torch.ones(batch, 1, **make)}
        return dict(hidden_states=sample, timestep=timestep,
                    encoder_hidden_states=torch.zeros(batch, tokens, config.caption_channels, **make),
                    encoder_attention_mask=torch.ones(batch, tokens, device=device, dtype=torch.long),
                    added_cond_kwargs=sizes)
    if getattr(config, "num_embeds_ada_norm", None):  # DiT: a class label
        return dict(hidden_states=sample, timestep=timestep,
                    class_labels=torch.zeros(batch, device=device, dtype=torch.long))
    raise ValueError(f"the inspector runs UNet2DConditionModel, DiT and PixArt denoisers, not {type(model).__name__}")


class _AttentionShapes(torch.overrides.TorchFunctionMode):
    """Records the (batch, heads, q_len, kv_len) of every SDPA call made inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, int, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.calls.append((q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]))
        return func(*args, **kwargs)


def count_on_meta(fn, *args, **kwargs) -> tuple[object, int, list]:
    """Run fn on meta tensors: (output, FLOPs counted by torch's FlopCounterMode, SDPA shapes)."""
    from studio.profiling import count_flops

    with torch.no_grad(), _AttentionShapes() as shapes:
        output, flops = count_flops(fn, *args, **kwargs)
    return output, flops, shapes.calls


def _params_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@functools.lru_cache(maxsize=32)
def _denoiser_cost(config_json: str, dtype: str, batch: int, latent_hw: tuple[int, int], text_tokens: int | None):
    model = diffusers_on_meta(json.loads(config_json), dtype)
    kwargs = denoiser_inputs(model, batch, latent_hw, text_tokens=text_tokens)
    output, flops, calls = count_on_meta(lambda **kw: model(**kw, return_dict=False)[0], **kwargs)
    # as the diffusion lane counts a call: its weights once, plus the tensors in and out
    nbytes = _params_bytes(model) + tensor_bytes(kwargs) + tensor_bytes(output)
    return model, flops, nbytes, calls


@functools.lru_cache(maxsize=32)
def _vae_decode_cost(config_json: str, dtype: str, latent_hw: tuple[int, int]):
    vae = diffusers_on_meta(json.loads(config_json), dtype)
    latents = torch.zeros(1, vae.config.latent_channels, *latent_hw, device="meta", dtype=TORCH_DTYPES.get(dtype))
    image, flops, calls = count_on_meta(lambda x: vae.decode(x, return_dict=False)[0], latents)
    decoder = [m for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None]
    nbytes = sum(_params_bytes(m) for m in decoder) + tensor_bytes(latents) + tensor_bytes(image)
    return vae, flops, nbytes, calls


def _analyse_diffusion(loaded: ModelConfig, dtype: str, image_size, guidance: bool) -> Analysis:
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"the diffusion inspector takes fp32, bf16 or fp16; got {dtype!r}")
    config = loaded.config
    vae_config = loaded.components.get("vae")
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8
    sample = config.get("sample_size") or 64
    rows, cols = (sample, sample) if isinstance(sample, int) else tuple(sample)
    if image_size is None:
        image = (rows * vae_factor, cols * vae_factor)
    else:
        image = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    latent_hw = (image[0] // vae_factor, image[1] // vae_factor)
    batch = 2 if guidance else 1
    text_encoder = loaded.components.get("text_encoder")
    tokens = None
    if text_encoder and "max_position_embeddings" in text_encoder and "unet" in str(diffusers_model_class(config).__name__).lower():
        tokens = text_encoder["max_position_embeddings"]

    key = json.dumps(config, sort_keys=True)
    model, flops, nbytes, calls = _denoiser_cost(key, dtype, batch, latent_hw, tokens)
    workloads = [Workload(
        "denoise step", f"{image[0]}x{image[1]} px, {'CFG: batch of 2' if guidance else 'no guidance: batch 1'}",
        flops, nbytes, tokens=1,
    )]
    components, component_bytes = {}, {}
    if vae_config:
        vae, vae_flops, vae_bytes, vae_calls = _vae_decode_cost(json.dumps(vae_config, sort_keys=True), dtype, latent_hw)
        workloads.append(Workload("vae decode", f"{image[0]}x{image[1]} px, batch 1", vae_flops, vae_bytes))
        components["vae"], component_bytes["vae"] = vae.num_parameters(), _params_bytes(vae)
        calls = calls + vae_calls
    for part in ("text_encoder", "text_encoder_2"):
        if part in loaded.components:
            encoder = text_encoder_on_meta(loaded.components[part], dtype)
            components[part], component_bytes[part] = encoder.num_parameters(), _params_bytes(encoder)
    largest = max(calls, key=lambda c: c[0] * c[1] * c[2] * c[3], default=None)
    size = DTYPE_BYTES[dtype]
    return Analysis(
        name=loaded.name, kind="diffusion", architecture=type(model).__name__, dtype=dtype,
        parameters=model.num_parameters(), weight_bytes=_weight_bytes(model), config=config,
        image_size=image, latent_shape=(batch, config.get("in_channels", 4), *latent_hw),
        components=components, component_bytes=component_bytes,
        attention_scores_bytes=(largest[0] * largest[1] * largest[2] * largest[3] * size) if largest else 0,
        attention_scores_shape=largest, workloads=workloads,
    )


# --- the terminal view -----------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_analysis(analysis: Analysis) -> str:
    """The analysis as a few aligned lines for a terminal."""
    a = analysis
    lines = [f"{a.name}: {a.architecture} ({a.kind})"]
    lines.append(f"  parameters      {a.parameters:,} ({human_count(a.parameters)})")
    weights = " · ".join(
        f"{k} {human_bytes(v)}" for k, v in a.weight_bytes.items() if k in ("fp32", "bf16", "int8")
    )
    lines.append(f"  weights         {weights}  (fp16 = bf16, fp8 = int8)")
    if a.kind == "llm":
        lines.append(
            f"  shape           {a.layers} layers · hidden {a.hidden} · {a.heads} heads, {a.kv_heads} KV heads of "
            f"{a.head_dim} · vocabulary {a.vocab:,} · context {a.context_length:,}" if a.context_length else
            f"  shape           {a.layers} layers · hidden {a.hidden} · {a.heads} heads · vocabulary {a.vocab:,}"
        )
        full = f" · {human_bytes(a.kv_bytes_full_context)} at the full context" if a.kv_bytes_full_context else ""
        lines.append(
            f"  KV cache        {a.kv_bytes_per_token:,} bytes/token in {a.dtype} "
            f"(2 × {a.layers} layers × {a.kv_heads} KV heads × {a.head_dim} × {DTYPE_BYTES[a.dtype]} B){full}"
        )
    else:
        parts = ", ".join(f"{name} {human_count(n)}" for name, n in a.components.items())
        lines.append(f"  image           {a.image_size[0]}x{a.image_size[1]} px, latents {a.latent_shape}")
        if parts:
            lines.append(f"  other models    {parts} parameters")
    if a.attention_scores_shape:
        b, h, q, k = a.attention_scores_shape
        lines.append(
            f"  attention       eager materialises {b}×{h}×{q}×{k} scores = {human_bytes(a.attention_scores_bytes)} "
            "per attention call; flash / SDPA / tiled kernels never build them"
        )
    lines.append(f"  work ({a.dtype})")
    for w in a.workloads:
        lines.append(
            f"    {w.name:<13} {human_count(w.flops):>9}FLOP {human_bytes(w.bytes):>10}  "
            f"{w.intensity:8.1f} FLOP/B   {w.detail}"
        )
    lines.append("  predicted (roofline: max(FLOPs / peak, bytes / bandwidth); ridge = peak / bandwidth)")
    names = [w.name for w in a.workloads]
    width = max((len(d) for d in a.devices), default=8)
    lines.append("    " + " " * width + "".join(f"  {n:>31}" for n in names))
    for device in a.devices:
        cells = []
        for n in names:
            p = a.predicted(device, n)
            rate = f"{p.per_second:,.0f} tok/s" if n in ("decode", "prefill") else f"{p.per_second:,.1f} /s"
            cells.append(f"  {_ms(p.ms):>9} {p.bound:>7} {rate:>15}")
        lines.append(f"    {device:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 0.1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"
