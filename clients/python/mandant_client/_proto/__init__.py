"""Generated protobuf and gRPC stubs (``make protos``); do not edit by hand."""
