"""The operators' HTTP surfaces: the REST API under /api/v1, the web page at /, /metrics,
/healthz and /readyz. Every route is a thin shell over machaon.operations."""
