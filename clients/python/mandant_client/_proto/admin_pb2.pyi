from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class FleetUsage(_message.Message):
    __slots__ = ("requests", "rows", "compute_seconds", "rejections")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ComputeSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.ScalarMap[str, int]
    rows: _containers.ScalarMap[str, int]
    compute_seconds: _containers.ScalarMap[str, float]
    rejections: _containers.ScalarMap[str, int]
    def __init__(self, requests: _Optional[_Mapping[str, int]] = ..., rows: _Optional[_Mapping[str, int]] = ..., compute_seconds: _Optional[_Mapping[str, float]] = ..., rejections: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "requests", "rows", "compute_seconds", "rejections", "rows_today", "rows_this_month", "quota_rows_per_day", "quota_rows_per_month", "quota_scope", "fleet_today", "fleet_this_month", "removed")
    class RequestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ComputeSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    ROWS_TODAY_FIELD_NUMBER: _ClassVar[int]
    ROWS_THIS_MONTH_FIELD_NUMBER: _ClassVar[int]
    QUOTA_ROWS_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    QUOTA_ROWS_PER_MONTH_FIELD_NUMBER: _ClassVar[int]
    QUOTA_SCOPE_FIELD_NUMBER: _ClassVar[int]
    FLEET_TODAY_FIELD_NUMBER: _ClassVar[int]
    FLEET_THIS_MONTH_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    requests: _containers.ScalarMap[str, int]
    rows: _containers.ScalarMap[str, int]
    compute_seconds: _containers.ScalarMap[str, float]
    rejections: _containers.ScalarMap[str, int]
    rows_today: int
    rows_this_month: int
    quota_rows_per_day: int
    quota_rows_per_month: int
    quota_scope: str
    fleet_today: FleetUsage
    fleet_this_month: FleetUsage
    removed: bool
    def __init__(self, tenant: _Optional[str] = ..., requests: _Optional[_Mapping[str, int]] = ..., rows: _Optional[_Mapping[str, int]] = ..., compute_seconds: _Optional[_Mapping[str, float]] = ..., rejections: _Optional[_Mapping[str, int]] = ..., rows_today: _Optional[int] = ..., rows_this_month: _Optional[int] = ..., quota_rows_per_day: _Optional[int] = ..., quota_rows_per_month: _Optional[int] = ..., quota_scope: _Optional[str] = ..., fleet_today: _Optional[_Union[FleetUsage, _Mapping]] = ..., fleet_this_month: _Optional[_Union[FleetUsage, _Mapping]] = ..., removed: _Optional[bool] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("tenants", "generated_at", "replica")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantUsage]
    generated_at: str
    replica: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[TenantUsage, _Mapping]]] = ..., generated_at: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...
