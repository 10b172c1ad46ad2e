"""Mandant: a multi-tenant gRPC inference server speaking the KServe v2 protocol."""

import os

__version__ = "0.1.0"

# gRPC's C core writes what any client can cause (a failed TLS handshake: plaintext
# to a TLS port, an unknown certificate) to stderr at INFO, a line a connection and
# not as the server's JSON log: 500 connections wrote 106 kB. Errors only, unless the
# operator asks for more; read when gRPC is first imported, so set here, before that.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
