"""``mandant.admin.v1.AdminService``: administration over gRPC, admin keys only (the
gate checks them before these methods run)."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from mandant.observability.usage import UsageReports
from mandant.transport.grpc.gateway import Access, Gate
from mandant.types import Call
from mandant_client._proto import admin_pb2 as pb

Context: TypeAlias = grpc.aio.ServicerContext
ADMIN_SERVICE = "mandant.admin.v1.AdminService"


def _fleet_usage(counts: dict[str, Any] | None) -> pb.FleetUsage | None:
    if counts is None:
        return None
    return pb.FleetUsage(
        requests={code: int(n) for code, n in counts["requests"].items()},
        rows={model: int(n) for model, n in counts["rows"].items()},
        compute_seconds=counts["compute_seconds"],
        rejections={reason: int(n) for reason, n in counts["rejections"].items()},
    )


def _tenant_usage(tenant: str, entry: dict[str, Any]) -> pb.TenantUsage:
    used = entry["quota"]["used"] or {}
    limits = entry["quota"]["limits"]
    fleet = entry["fleet"] or {}
    return pb.TenantUsage(
        tenant=tenant,
        requests={code: int(n) for code, n in entry["requests"].items()},
        rows={model: int(n) for model, n in entry["rows"].items()},
        compute_seconds=entry["compute_seconds"],
        rejections={reason: int(n) for reason, n in entry["rejections"].items()},
        rows_today=used.get("rows_today", 0),
        rows_this_month=used.get("rows_this_month", 0),
        quota_rows_per_day=limits.get("rows_per_day", 0),
        quota_rows_per_month=limits.get("rows_per_month", 0),
        quota_scope=entry["quota"]["scope"],
        fleet_today=_fleet_usage(fleet.get("today")),
        fleet_this_month=_fleet_usage(fleet.get("this_month")),
        removed=entry["removed"],
    )


class AdminServicer:
    def __init__(self, reports: UsageReports) -> None:
        self._reports = reports

    async def GetUsage(
        self, request: pb.GetUsageRequest, call: Call, context: Context
    ) -> pb.GetUsageResponse:
        only = self._reports.named(request.tenant) if request.tenant else None
        report = await self._reports.report(only=only)
        return pb.GetUsageResponse(
            generated_at=report["generated_at"],
            replica=report["replica"],
            tenants=[
                _tenant_usage(tenant, entry)
                for tenant, entry in report["tenants"].items()
                if not request.tenant or tenant == request.tenant
            ],
        )


def admin_handlers(servicer: AdminServicer, gate: Gate) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of the admin service, behind the gate's admin-key check."""
    service = pb.DESCRIPTOR.services_by_name["AdminService"]
    return {
        method.name: gate.unary(
            f"/{ADMIN_SERVICE}/{method.name}",
            Access.ADMIN,
            getattr(pb, method.input_type.name),
            getattr(servicer, method.name),
            getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
