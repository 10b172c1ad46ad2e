"""Per-call context: who is calling and which request, for the servicer and logs."""

from __future__ import annotations

from contextvars import ContextVar

from mandant.types import Tenant

#: The authenticated tenant of the call being served.
current_tenant: ContextVar[Tenant] = ContextVar("current_tenant")
#: The id of the call being served (the v2 request ``id``, may be empty).
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")
#: The configured name of the model serving the current inference call ("" until
#: the data plane has resolved one); a metrics label, never client text.
current_model: ContextVar[str] = ContextVar("current_model", default="")
