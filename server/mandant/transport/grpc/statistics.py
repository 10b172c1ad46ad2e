"""ModelStatistics: which statistics a caller sees, as Triton's messages.

* A tenant key: its own calls only, to the models it sees, under the names it calls
  them (its tuned variant under the base's name). Another tenant's calls never count,
  and no ``batch_stats``: a batch mixes tenants, so its size would tell one tenant how
  many rows others sent with it (the dashboard hides batch figures from tenants too).
  For the same reason its ``compute_infer`` time is its rows' share of its batches'
  compute, as ``/usage`` bills it (Triton's, each batch's whole time per request,
  divided by that share, gave the batch's rows).
* An admin key with the metadata ``mandant-tenant: <tenant id>`` (Triton's request has
  no tenant field): exactly what that tenant sees.
* An admin key alone: every model version's totals over all tenants (its executions
  counted once, whichever tenants' rows a batch held); a model a tenant owns (private
  or tuned) is named ``<tenant>/<name>``.

Triton's filters: ``name`` (empty: every model) and ``version`` (empty: every
version); a name the caller cannot see is NOT_FOUND, as for every model RPC.

``compute_input`` and ``compute_output`` are counted but 0 ns: Mandant measures the
backend call as a whole, in ``compute_infer``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mandant.errors import ModelNotFound
from mandant.observability.stats import Duration, InferenceStats, ModelStats
from mandant.registry import Model, requested_version
from mandant.service import DataPlane
from mandant.types import Tenant
from mandant_client._proto import grpc_service_pb2 as pb

#: Request metadata by which an admin key reads one tenant's statistics.
TENANT_METADATA = "mandant-tenant"


def model_statistics(
    plane: DataPlane,
    stats: InferenceStats,
    caller: Tenant | None,
    named: str | None,
    name: str,
    version: str,
) -> list[pb.ModelStatistics]:
    """What ``caller`` sees (None: an admin key), or, for an admin, what the tenant it
    ``named`` sees (INVALID_ARGUMENT if none is configured under that name)."""
    if caller is None and named:
        caller = plane.tenant_named(named)
    if caller is None:
        return admin_statistics(plane, stats, name, version)
    return tenant_statistics(plane, stats, caller, name, version)


def tenant_statistics(
    plane: DataPlane, stats: InferenceStats, tenant: Tenant, name: str, version: str
) -> list[pb.ModelStatistics]:
    return [
        statistics_message(
            m.key.name,
            m.key.version,
            stats.get(tenant.id, m.key.owner or "", m.key.name, m.key.version),
            tenant_view=True,
        )
        for m in _visible(plane, tenant, name, version)
    ]


def admin_statistics(
    plane: DataPlane, stats: InferenceStats, name: str, version: str
) -> list[pb.ModelStatistics]:
    version = requested_version(version) if version else version  # "01" is 1, as resolve
    shown = []
    for model in plane.all_models():
        key = model.key
        label = key.name if key.owner is None else f"{key.owner}/{key.name}"
        if name and (name not in (key.name, label) or (version and version != key.version)):
            continue  # no name: every model's every version, as a tenant's view and Triton
        shown.append((label, key))
    scopes = {(key.owner or "", key.name, key.version) for _, key in shown}
    totals = stats.totals(scopes if name else None)
    answer = []
    for label, key in shown:
        total = totals.get((key.owner or "", key.name, key.version)) or ModelStats()
        # Executions once each (the tenants' entries hold a shared batch once each).
        runs = stats.executions(key.owner or "", key.name, key.version)
        total.batches, total.execution_count = runs.batches, runs.execution_count
        answer.append(statistics_message(label, key.version, total))
    if name and not answer:
        raise ModelNotFound(name, version or None)
    return answer


def _visible(plane: DataPlane, tenant: Tenant, name: str, version: str) -> Sequence[Model]:
    if not name:
        return plane.repository_index(tenant)
    if version:
        return [plane.model(tenant, name, version)]
    plane.model(tenant, name)  # NOT_FOUND for a name this tenant cannot see
    return plane.model_versions(tenant, name)


def statistics_message(
    name: str, version: str, stats: ModelStats, tenant_view: bool = False
) -> pb.ModelStatistics:
    """One model version's ``stats`` as Triton's message; ``tenant_view``: what a
    tenant sees (no batch figures, and its rows' share of the compute: module doc)."""
    compute = stats.compute_infer
    if tenant_view:
        compute = Duration(compute.count, stats.compute_share_ns)
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=pb.StatisticDuration(count=compute.count),
            compute_infer=_duration(compute),
            compute_output=pb.StatisticDuration(count=compute.count),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=pb.StatisticDuration(count=executions.count),
                compute_infer=_duration(executions),
                compute_output=pb.StatisticDuration(count=executions.count),
            )
            for size, executions in sorted(stats.batches.items())
            if not tenant_view
        ],
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)
