"""Configuration: frozen pydantic models, YAML in, validated once at start.

A file that does not validate raises :class:`ConfigError` listing every problem with
its field path (``models.2.inputs.0.datatype: …``). Model paths are relative to the
configuration file. :func:`load_config` replaces ``${NAME}`` in the file's string values
with the environment variable ``NAME`` (``$${`` is a literal ``${``), so secrets such as
key hashes and Redis passwords can come from the environment instead of the file.

The package is split by topic; import from ``mandant.config``, which re-exports every
public name: ``server`` (listeners, TLS, request bounds), ``tenants`` (tenants, rate
limits, quotas, SLOs, the limits store), ``models`` (model entries: tensors, batching,
Triton, version policies, warm-up, devices), ``specs`` (:class:`ModelSpec` and how
entries resolve into it), ``root`` (:class:`MandantConfig` and its cross-section
checks), ``loading`` (files, ``${NAME}`` expansion, reloads).
"""

from __future__ import annotations

from mandant.config.loading import config_folder, load_config, parse_config, reloaded
from mandant.config.models import (
    MAX_WARMUP_ELEMENTS,
    SERVE_ALL,
    BatchingConfig,
    ModelConfig,
    TensorConfig,
    TritonModelConfig,
    VersionPolicyConfig,
    WarmupConfig,
    WarmupTensorConfig,
    check_devices,
    gpu_index,
)
from mandant.config.root import MandantConfig
from mandant.config.server import (
    DEFAULT_MAX_BYTES_ELEMENTS,
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_MESSAGE_READ_TIMEOUT_S,
    InternalHttpConfig,
    ServerConfig,
    TlsConfig,
)
from mandant.config.specs import ModelSpec
from mandant.config.tenants import (
    LimitsConfig,
    ModelLimitsConfig,
    QuotaConfig,
    RateLimitConfig,
    SloConfig,
    TenantConfig,
)

__all__ = [
    "DEFAULT_MAX_BYTES_ELEMENTS",
    "DEFAULT_MAX_JSON_BYTES",
    "DEFAULT_MESSAGE_READ_TIMEOUT_S",
    "MAX_WARMUP_ELEMENTS",
    "SERVE_ALL",
    "BatchingConfig",
    "InternalHttpConfig",
    "LimitsConfig",
    "MandantConfig",
    "ModelConfig",
    "ModelLimitsConfig",
    "ModelSpec",
    "QuotaConfig",
    "RateLimitConfig",
    "ServerConfig",
    "SloConfig",
    "TenantConfig",
    "TensorConfig",
    "TlsConfig",
    "TritonModelConfig",
    "VersionPolicyConfig",
    "WarmupConfig",
    "WarmupTensorConfig",
    "check_devices",
    "config_folder",
    "gpu_index",
    "load_config",
    "parse_config",
    "reloaded",
]
