"""The wire contract: generated protobuf/gRPC modules (see protos/*.proto)."""
