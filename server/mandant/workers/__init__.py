"""Several processes on one host: N gRPC front ends, one engine, a supervisor."""
