"""Model shapes, read from a Hugging Face config dict (config.json, GGUF metadata, or a named preset)."""
from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The model cannot run here (architecture, rope type, context): the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        arch = (d.get("architectures") or [_arch_from_type(d.get("model_type", ""))])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}: kcache runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"unsupported rope type {rope_type!r}: kcache supports {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope["rope_type"] = rope_type
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        window = d.get("sliding_window") if (arch != "Qwen2ForCausalLM" or d.get("use_sliding_window")) else None
        if d.get("mlp_bias"):
            raise UnsupportedModelError("MLP biases are not supported")
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=rope,
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )

    def check_context(self, max_len: int) -> None:
        """Refuse a context the model cannot attend over exactly (Mistral's sliding window)."""
        if self.sliding_window is not None and self.sliding_window < max_len:
            raise UnsupportedModelError(
                f"this model's sliding window ({self.sliding_window} tokens) is shorter than the requested context "
                f"({max_len} tokens); KCache attends over every cached token: lower max_model_len to {self.sliding_window}"
            )


def _arch_from_type(model_type: str) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        model_type, model_type or "unknown"
    )
