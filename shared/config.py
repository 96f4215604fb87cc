"""The one model configuration every volume reads.

`ModelConfig` is the single source of the LLaMA architecture (Touvron et al. 2023, "LLaMA: Open and
Efficient Foundation Language Models", section 2.2; grouped-query attention from Ainslie et al. 2023).
It imports no torch, so Volume 1 (NumPy) and the data tools can use it too.

The FFN width follows Meta's reference code: start from 4*dim, take two thirds (SwiGLU has three
matrices instead of two, so this keeps the parameter count of a 4*dim MLP), optionally scale by
`ffn_dim_multiplier`, then round up to a multiple of `multiple_of`. Setting `hidden_dim` overrides all
of that.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a LLaMA-style decoder-only transformer.

    Fields:
        dim: model (residual stream) width D.
        n_layers: number of transformer blocks.
        n_heads: query heads H; head_dim = dim // n_heads.
        n_kv_heads: key/value heads Hkv (GQA). Hkv == H is multi-head, Hkv == 1 is multi-query.
            `None` means "same as n_heads".
        vocab_size: V, including special tokens.
        hidden_dim: SwiGLU hidden width F. `None` derives it from `multiple_of`/`ffn_dim_multiplier`.
        multiple_of: round the derived F up to a multiple of this.
        ffn_dim_multiplier: optional scale on the derived F (Meta uses 1.3 for 70B).
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base (10000 in LLaMA 1/2, 500000 in LLaMA 3).
        max_seq_len: the longest sequence RoPE tables (and the KV cache) are built for.
        tie_embeddings: share `tok_embeddings.weight` with `output.weight`.

    Derived (computed once, in `__post_init__`): `head_dim`, `n_rep` (query heads per KV head) and,
    when not given, `hidden_dim`.

    Raises:
        ValueError: naming the field, for non-positive sizes, `dim % n_heads != 0`,
            `n_heads % n_kv_heads != 0`, odd `head_dim` (RoPE rotates pairs), or a bad eps/theta.
    """

    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None
    vocab_size: int = 4096
    hidden_dim: int | None = None
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = True

    head_dim: int = field(init=False)
    n_rep: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
            raise ValueError(f"ModelConfig.n_kv_heads must be a positive integer, got {self.n_kv_heads!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        head_dim = self.dim // self.n_heads
        if head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim = dim/n_heads = {head_dim} must be even (RoPE rotates pairs); "
                f"change dim or n_heads"
            )
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(
                f"ModelConfig.ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier!r}"
            )
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            hidden = self.multiple_of * math.ceil(hidden / self.multiple_of)
            object.__setattr__(self, "hidden_dim", hidden)
        if not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0:
            raise ValueError(f"ModelConfig.hidden_dim must be a positive integer, got {self.hidden_dim!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"ModelConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ValueError(f"ModelConfig.rope_theta must be > 1, got {self.rope_theta!r}")
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "n_rep", self.n_heads // self.n_kv_heads)

    # --- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The init fields only (derived ones are recomputed on load); `hidden_dim` is resolved."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict; unknown keys raise `ValueError` naming them (a typo never passes silently)."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        derived = {f.name for f in dataclasses.fields(cls) if not f.init}
        unknown = sorted(set(d) - names - derived)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again). Pass `hidden_dim=None` to re-derive F."""
        d = self.to_dict()
        if {"dim", "multiple_of", "ffn_dim_multiplier"} & set(changes) and "hidden_dim" not in changes:
            d["hidden_dim"] = None  # re-derive F from the new width
        d.update(changes)
        return ModelConfig.from_dict(d)

    # --- sizes ---------------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count. With tied embeddings the shared matrix counts once.

        `include_embeddings=False` leaves out the token embedding and the LM head (Kaplan et al. 2020's
        "non-embedding" count, the N of scaling laws).
        """
        D, F, V = self.dim, self.hidden_dim, self.vocab_size
        kv = self.n_kv_heads * self.head_dim
        per_layer = D * D + 2 * D * kv + D * D + 3 * D * F + 2 * D  # wq, wk+wv, wo, w1/w2/w3, two norms
        n = self.n_layers * per_layer + D  # + final norm
        if include_embeddings:
            n += V * D * (1 if self.tie_embeddings else 2)
        return n

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of K and V cached per token across all layers: 2 * n_layers * Hkv * hd * bytes."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


# Named presets, by size. `small` is the default for `make vol2-train`: chosen by measurement on a
# 2-core CPU (see vol2_torch/README.md, "How the small preset was chosen").
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                        multiple_of=16),
    # ~2M parameters: trains in ten minutes on two CPU cores; the model the chapters' figures use.
    "small": ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=2048, max_seq_len=256),
    # ~7M: the TinyStories 15M shape of llama2.c with the vocabulary cut to 4096 (head dim 48, MHA);
    # `make vol2-bench` uses it.
    "medium": ModelConfig(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=4096, max_seq_len=256),
    # ~40M: a LLaMA-style vocabulary of 32,000 and 1,024 positions; memory-bound at decode.
    "large": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000, max_seq_len=1024),
}
# The names these presets had before they were named by size; still accepted everywhere a preset is.
PRESET_ALIASES: dict[str, str] = {"cpu": "small", "hf288": "medium", "seed512": "large"}


def preset_name(name: str) -> str:
    """The preset's own name for `name`, which may be an old alias ("cpu" -> "small").
    Raises `ValueError` listing the known names."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} "
                         f"(old names: {', '.join(f'{a}={n}' for a, n in PRESET_ALIASES.items())})")
    return name


def get_preset(name: str) -> ModelConfig:
    """The preset called `name` (or an old alias of it). Raises `ValueError` listing the known names."""
    return PRESETS[preset_name(name)]


def describe_presets() -> str:
    """A table of the presets: size, parameters, and KV-cache bytes per token (bf16) as GQA and as MHA."""
    rows = ["| preset | D / L / H / Hkv / V / T | parameters (non-embedding) | KV cache bf16, per token: as configured | same model as MHA |",
            "|---|---|---|---|---|"]
    for name, c in PRESETS.items():
        mha = c.replace(n_kv_heads=c.n_heads)
        rows.append(f"| {name} | {c.dim} / {c.n_layers} / {c.n_heads} / {c.n_kv_heads} / {c.vocab_size} / "
                    f"{c.max_seq_len} | {c.num_params():,} ({c.num_params(False):,}) | "
                    f"{c.kv_cache_bytes_per_token(2):,} B | {mha.kv_cache_bytes_per_token(2):,} B |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe_presets())
