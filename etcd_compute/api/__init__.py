"""The API server: eschedule's operations over HTTP, for holders of a project's token.

A third side beside eschedule and ecompute: it calls eschedule's Operations (one
implementation of every operation for the CLI and the API) and never ecompute. `eapi`
serves the versioned REST API under /v1 (OpenAPI at /v1/openapi.json), the dashboard
under /ui and Prometheus metrics at /metrics.
"""
