"""Separation options, validated on construction; no TensorFlow needed to build them (the CLI parses flags fast)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from sepconv.convert.errors import InvalidOptionError
from sepconv.deploy.choices import (DEPTHWISE, FORMS, SPATIAL, Choice, choice_label,  # noqa: F401  (re-exported)
                                    choice_of_key, choice_order, is_choice, parse_choice, spatial_choice)


@dataclass(frozen=True)
class RankPolicy:
    """How the rank is chosen for a layer: a fixed rank, "full" (exact), or the smallest rank retaining `energy`; in
    `form` (DEPTHWISE: K, the depth multiplier; SPATIAL: r, the channels between the two halves)."""

    rank: int | str | None
    energy: float | None
    form: str = DEPTHWISE

    def choose(self, spectrum) -> int:
        """The rank for a layer, given its `svd.KernelSpectrum` (or `svd.SpatialSpectrum` in the spatial form)."""
        if self.rank == "full":
            return spectrum.full_rank
        if self.rank is not None:
            return min(int(self.rank), spectrum.full_rank)
        return spectrum.rank_for_energy(self.energy)


# Without rank or energy, each layer keeps the smallest K that retains this fraction of its kernel's energy
# (squared Frobenius norm). See docs/separation.md for why this value.
DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class SeparationOptions:
    """What `separate` does, validated on construction.

    rank: an int K (the SeparableConv2D depth multiplier, clipped to the exact rank) or "full" (exact).
    energy: a fraction in (0, 1]: per layer, the smallest K keeping that share of the kernel's energy.
    include / exclude: fnmatch patterns on layer names or paths ("inner_model/conv*"); exclude wins.
    only_if_smaller: keep a layer whose separated form would have as many parameters or more.
    ranks: per-layer choices by layer name or path ({"block1_conv1": 2, "block2_conv1": "s16"}; an int is K, 0 keeps
    the layer as it is, "s<r>" is the spatial form at rank r); wins over rank / energy / form for those layers (the
    accuracy-budget search hands its choice to `separate` this way).
    form: DEPTHWISE (SeparableConv2D, rank = K) or SPATIAL (a kh x 1 then a 1 x kw Conv2D, rank = r) for the layers
    that rank / energy decide.
    """

    rank: int | str | None = None
    energy: float | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    only_if_smaller: bool = True
    ranks: dict | None = None
    form: str = DEPTHWISE

    def __post_init__(self):
        if self.rank is not None and self.energy is not None:
            raise InvalidOptionError(
                f"Got both rank={self.rank!r} and energy={self.energy!r}; give one of them (or neither for the "
                f"default energy={DEFAULT_ENERGY})")
        if self.rank is not None and self.rank != "full" and not (
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1
        ):
            raise InvalidOptionError(f"Unrecognized rank={self.rank!r}. Use a whole number >= 1 or 'full'")
        if self.energy is not None and not (
            isinstance(self.energy, (int, float)) and not isinstance(self.energy, bool) and 0 < self.energy <= 1
        ):
            raise InvalidOptionError(f"Unrecognized energy={self.energy!r}. Use a fraction in (0, 1], e.g. 0.99")
        if self.ranks is not None and not (isinstance(self.ranks, dict) and all(
            isinstance(k, str) and is_choice(v) for k, v in self.ranks.items())):
            raise InvalidOptionError(f"Unrecognized ranks={self.ranks!r}. Use a dict of layer name or path -> "
                                     f"whole number >= 0 (0 keeps the layer) or 's<r>' (the spatial form at rank "
                                     f"r), e.g. {{'block1_conv1': 2, 'block2_conv1': 's16'}}")
        if self.form not in FORMS:
            raise InvalidOptionError(f"Unrecognized form={self.form!r}. Use one of {list(FORMS)}")
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude") or ())

    @property
    def policy(self) -> RankPolicy:
        if self.rank is None and self.energy is None:
            return RankPolicy(rank=None, energy=DEFAULT_ENERGY, form=self.form)
        return RankPolicy(rank=self.rank, energy=self.energy, form=self.form)

    def describe(self) -> dict:
        policy = self.policy
        described = {"rank": policy.rank, "energy": policy.energy, "include": self.include, "exclude": self.exclude,
                     "only_if_smaller": self.only_if_smaller, "ranks": self.ranks}
        return described if self.form == DEPTHWISE else {**described, "form": self.form}

    def context(self, path: str) -> Context:
        policy = self.policy
        own = (self.ranks or {}).get(path, (self.ranks or {}).get(path.rsplit("/", 1)[-1]))
        if own is not None:
            form, rank = parse_choice(own)
            policy = RankPolicy(rank=rank, energy=None, form=form)
        return Context(path=path, policy=policy, include=self.include, exclude=self.exclude,
                       only_if_smaller=self.only_if_smaller)


def _patterns(value, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(p, str) and p for p in value):
        raise InvalidOptionError(f"Unrecognized {name}={value!r}. Use layer-name patterns such as 'block1_*'")
    return value


@dataclass(frozen=True)
class Context:
    """What a rewrite knows besides the layer: where it is and what the user asked for."""

    path: str
    policy: RankPolicy
    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    only_if_smaller: bool

    def user_skip_reason(self, name: str) -> str | None:
        """Why the user's include/exclude patterns leave this layer alone, or None."""
        candidates = (name, self.path)
        for pattern in self.exclude:
            if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
                return f"excluded by pattern {pattern!r}"
        if self.include is not None and not any(
            fnmatch.fnmatchcase(c, pattern) for c in candidates for pattern in self.include
        ):
            return f"not matched by include patterns {list(self.include)}"
        return None
