"""The admission seam: may this tenant run this many rows on this model now?"""

from __future__ import annotations

from typing import Protocol

from mandant.types import ModelKey, Tenant


class Permit(Protocol):
    def release(self) -> None:
        """Called exactly once when the admitted request has finished."""
        ...


class Admission(Protocol):
    async def admit(self, tenant: Tenant, model: ModelKey, rows: int) -> Permit:
        """Return a permit, or raise a ResourceExhausted subclass (nothing consumed)."""
        ...


class _NoPermit:
    def release(self) -> None:
        return None


class Unlimited:
    """Admits everything: the data plane's default when no limits are configured."""

    _permit = _NoPermit()

    async def admit(self, tenant: Tenant, model: ModelKey, rows: int) -> Permit:
        return self._permit
