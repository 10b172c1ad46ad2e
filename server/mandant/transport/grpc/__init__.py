"""The gRPC front end: the only part of Mandant that knows grpc and protobuf."""
