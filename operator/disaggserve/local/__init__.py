"""Running without a cluster: a local Kubernetes API, and (later) a node agent for `disaggserve up`."""
