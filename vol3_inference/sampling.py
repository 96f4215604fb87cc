"""Turning next-token logits into a token: greedy, temperature, top-k, top-p, repetition penalty.

Given logits z (V,) for the next token, in this order:

1. repetition penalty p (Keskar et al. 2019, "CTRL", section 4.1): for every token already in the
   prompt or output, z_i <- z_i / p if z_i > 0 else z_i * p. Dividing a *negative* logit by p > 1
   would raise it (make the token more likely); multiplying lowers it, which is what is meant.
2. temperature t: t == 0 means greedy (argmax, no randomness); otherwise z <- z / t. A temperature
   below MIN_TEMPERATURE (1e-5, vLLM's threshold) is greedy too: z / t would overflow float64 for
   t near 5e-324 and is already an argmax in all but ties well before that. A logit that still
   overflows to +inf (e.g. through a tiny repetition penalty) is clamped to the largest float64, so
   the draw stays a draw among the top tokens instead of a NaN.
3. top-k: keep the k largest logits (k = 0: all).
4. top-p, nucleus sampling (Holtzman et al. 2020, section 3.1): keep the smallest set of most likely
   tokens whose probability mass reaches p (the most likely token always stays).
5. draw from softmax(z) with the request's own `torch.Generator`, seeded by `seed`: a seeded request
   makes the same draws whether it runs alone or in a batch, since no other request touches its
   generator.

Stopping (checked by the caller after each token): `max_tokens` new tokens, a token in
`stop_token_ids` (the eos id too unless `ignore_eos`), or a string in `stop` appearing in the output
text (the text is cut before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shared.sampling import MIN_TEMPERATURE, filter_logits
from vol3_inference import cpu_kernels


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (defaults: greedy, 16 new tokens).

    Raises ValueError naming the field for an invalid value (see `validate`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_real(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            bad("seed", "must be an integer in [0, 2**64) or None")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        """Argmax, no randomness: temperature 0, or under MIN_TEMPERATURE."""
        return self.temperature < MIN_TEMPERATURE

    @property
    def argmax_only(self) -> bool:
        """The token is the argmax of the logits themselves: greedy, no repetition penalty (so
        `greedy_tokens` can pick it for a whole step at once)."""
        return self.greedy and self.repetition_penalty == 1


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded if `seed` is given, else from fresh OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,) with z_i / p for seen positive z_i and z_i * p for seen negative ones (a copy)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    z = logits.clone()
    picked = z[seen]
    z[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return z


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                 seen: torch.Tensor | None = None) -> int:
    """One token id from logits (V,) following `params`; `seen` (n,) int64 are prompt + output ids.
    Sampling runs in float64 on the CPU, whatever device the logits come from (the generator is a
    CPU one, so a seeded run draws the same tokens on any device). Raises ValueError (greedy) or
    RuntimeError (sampled) for logits holding NaN."""
    if params.greedy and seen is None:  # the argmax of the logits themselves: float64 would not change it
        tok = greedy_tokens(logits.reshape(1, -1))[0]  # the C scan where it runs (probes argmax: 14 vs 75 us at V = 32,000)
        return _not_nan(tok, logits.reshape(-1))
    z = logits.detach().to("cpu", torch.float64)
    if seen is not None:
        z = apply_repetition_penalty(z, seen, params.repetition_penalty)
    if params.greedy:
        return _not_nan(int(torch.argmax(z)), z)
    # +inf -> the largest float64, so softmax sees max - max = 0 and not inf - inf = NaN (NaN stays,
    # and multinomial refuses it)
    z = filter_logits((z / params.temperature).clamp(max=torch.finfo(z.dtype).max), params.top_k, params.top_p)
    probs = torch.softmax(z, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _not_nan(tok: int, z: torch.Tensor) -> int:
    # an argmax lands on the first NaN of a row that has one: no meaningful token to give
    if torch.isnan(z[tok]):
        raise ValueError("the logits contain NaN")
    return tok


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of a step's logits (R, V), as `Engine.forward_last` returns them:
    `sample_token`'s greedy path for a whole step in one call (the first maximal index on ties, or the
    first NaN, as torch.argmax gives). float32 rows on the CPU, each contiguous, go to the C kernel's
    `argmax_rows` where it can run: torch's argmax along a row is a scalar loop, a visible part of a
    many-row decode step on a small model (and of any step over a 32,000-token vocabulary), where the
    C scan runs 8 floats at a time (the kernel library is built at its first use, whatever the
    engine's backend). Elsewhere torch.argmax. Raises ValueError unless logits is 2-D."""
    if logits.dim() != 2:
        raise ValueError(f"greedy_tokens: logits (R, V) expected, got shape {tuple(logits.shape)}")
    if cpu_kernels.argmax_rows_problem(logits) is None and cpu_kernels.unavailable("ops_avx2") is None:
        return cpu_kernels.argmax_rows(logits, checked=True)
    return torch.argmax(logits, dim=-1).tolist()


def find_stop(text: str, stops: tuple[str, ...], search_from: int = 0) -> int:
    """Index of the earliest stop string in text[search_from:] (as an index into text), or -1."""
    hits = [i for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else -1
