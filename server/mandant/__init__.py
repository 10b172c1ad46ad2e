"""Mandant: a multi-tenant gRPC inference server speaking the KServe v2 protocol."""

__version__ = "0.1.0"
