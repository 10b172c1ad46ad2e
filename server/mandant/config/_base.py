"""What every section of the configuration shares: the frozen base model, the
patterns names and key hashes must match and their checks, whether a named file can be
read, and how a validation error becomes the list of (field path, reason) problems a
:class:`~mandant.errors.ConfigError` reports (``_Problems`` lets one validator report
several, each at its own path)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

# Patterns a whole value must match (``fullmatch``: with ``match``, ``$`` let a final
# newline through: "acme\n" was a second tenant that looked like acme).
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class _Problems(ValueError):
    """Several problems found by one validator, each (field path relative to the model
    validated, reason): :func:`parse_config` reports each at its own path, where
    pydantic alone would report one message at the model's."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))
        self.problems = problems


class _Frozen(BaseModel):
    """Every section of the configuration: immutable, unknown keys refused, and no
    number infinite or NaN (an SLO of ``.inf`` ms passed, and the dashboard's JSON then
    held ``Infinity``, which browsers refuse: the page broke for the tenant and the
    admin; a Triton ``timeout_s`` of ``.inf`` overflowed every call's deadline)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _hashes_only(keys: tuple[str, ...]) -> tuple[str, ...]:
    for key in keys:
        if not _KEY_HASH.fullmatch(key):
            raise ValueError(
                "API keys are stored as 'sha256:<64 hex digits>' only; "
                "`mandant keygen` prints a key and its hash"
            )
    return keys


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not a file this process can read; None if it is."""
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return None


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Each problem as (field path, message); parts of the path kept short. A
    ``_Problems`` is unpacked, each of its problems at its own path."""
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        where = ".".join(str(part)[:64] for part in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            errors += [(f"{where}.{path}" if where else path, why) for path, why in cause.problems]
        else:  # a validator's ValueError: its words, without pydantic's "Value error, "
            message = err["msg"].removeprefix("Value error, ")
            errors.append((where or "(top level)", message))
    return errors
