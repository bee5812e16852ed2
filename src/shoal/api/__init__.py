"""OpenAI-compatible HTTP API: routes parse and validate, call serving/, return JSON or SSE."""
