"""The worker HTTP server and the Prometheus helpers it shares with the router."""
