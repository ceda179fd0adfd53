"""Generated gRPC stubs of the kubelet APIs (proto/); regenerate with hack/gen-proto.sh."""
