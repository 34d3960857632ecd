"""The steering server: an OpenAI-compatible HTTP service over one model with per-request profiles."""
