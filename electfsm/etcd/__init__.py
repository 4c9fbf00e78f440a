"""The etcd transport: unary calls with failover, the watch and keepalive streams,
TLS and authentication, and the translation of gRPC errors."""
