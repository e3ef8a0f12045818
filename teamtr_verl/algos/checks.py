"""Argument checks shared by the algos modules: every error names the argument and the offending value.

Also the duck-typed config lookup of the verl adapters and :func:`factorize` (labels -> integer codes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _as_float(name: str, value: Any, expected: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {expected}, got {name}={value!r}") from None


def _check_positive(name: str, value: Any) -> float:
    v = _as_float(name, value, "a number > 0")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value!r}")
    return v


def _check_nonneg(name: str, value: Any) -> float:
    v = _as_float(name, value, "a number >= 0")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value!r}")
    return v


def _check_finite_scalar(name: str, value: Any) -> float:
    v = _as_float(name, value, "a finite number")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {name}={value!r}")
    return v


def _check_kl_value(name: str, value: Any) -> float:
    """A measured KL: any number but NaN or −inf (+inf is a legitimate, far out-of-region measurement)."""
    v = _as_float(name, value, "a number")
    if math.isnan(v) or v == -math.inf:
        raise ValueError(f"{name} must not be NaN or -inf, got {name}={value!r}")
    return v


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")
    return value


def _check_tensor(name: str, value: Any, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {name} of type {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {name} with shape {tuple(value.shape)}")
    return value


def _check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _check_tensor(name, value)
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {name} with shape {tuple(value.shape)}"
        )


def _as_mask(name: str, mask: Any, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """Boolean copy of a 0/1 (or bool) mask with the shape of ``ref``."""
    _check_same_shape(name, mask, ref_name, ref)
    return mask.bool()


def _check_nonempty_mask(name: str, mask: torch.Tensor) -> None:
    if not bool(mask.any()):
        raise ValueError(
            f"{name} selects no token (empty agent mask), got {name}.sum()=0 over shape {tuple(mask.shape)}"
        )


def _check_finite_in_mask(name: str, value: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise if ``value`` holds NaN/inf at a position selected by ``mask`` (positions outside are never read).

    Fast path: the masked sum is finite iff no masked entry is NaN/inf (barring a float overflow of the sum, which
    the exact element-wise check below then clears); only a non-finite sum pays for locating the culprit.
    """
    if bool(torch.isfinite(torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=value.device)).sum())):
        return
    bad = mask & ~torch.isfinite(value)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite on masked tokens, got {name}{idx}={value[tuple(idx)].item()!r}")


def _check_rows(name: str, n: int, bs: int) -> None:
    if n != bs:
        raise ValueError(f"{name} must have one entry per row (bs={bs}), got {name} of length {n}")


def factorize(labels: Any, name: str = "labels") -> tuple[torch.Tensor, int]:
    """Map arbitrary labels to contiguous integer codes, vectorized.

    Args:
        labels: `(np.ndarray | list | torch.Tensor)`
            shape (n,). Any hashable, sortable labels (verl's ``uid`` strings, ints...).
        name: argument name used in error messages.

    Returns:
        codes: `(torch.LongTensor)`
            shape (n,), values in ``[0, n_unique)``; equal labels get equal codes.
        n_unique: `(int)`
    """
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got {name} with shape {tuple(labels.shape)}")
        if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError(f"{name} must not contain NaN/inf, got {name}={labels.tolist()!r}")
        uniq, codes = torch.unique(labels, return_inverse=True)
        return codes.long(), int(uniq.numel())
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {name} with shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} must not contain NaN/inf, got {name}={arr.tolist()!r}")
    try:
        uniq, codes = np.unique(arr, return_inverse=True)
        n_unique = len(uniq)
    except TypeError:  # unorderable mixture of label types: fall back to first-seen order
        table: dict[Any, int] = {}
        codes = np.fromiter((table.setdefault(x, len(table)) for x in arr.tolist()), dtype=np.int64, count=len(arr))
        n_unique = len(table)
    return torch.as_tensor(np.asarray(codes, dtype=np.int64).reshape(-1)), int(n_unique)


def _cfg_get(cfg: Any, key: str) -> Any:
    """Duck-typed config lookup (dict, DictConfig, verl BaseConfig, plain object); None when absent."""
    if cfg is None:
        return None
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - e.g. a struct DictConfig refusing an unknown key
            return None
    return getattr(cfg, key, None)


def _first_set(*values: Any, default: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return default
