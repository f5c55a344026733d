"""`llamazoo serve`: an OpenAI-compatible HTTP server with continuous batching.

- scheduler.py: sequences join and leave the running batch between decode steps (chunked prefill, prefix
  reuse, one batched decode step over a KV cache row per sequence); pure Python/torch, no HTTP.
- api.py: the FastAPI app, request models and OpenAI-shaped errors; metrics.py: Prometheus text.
- server.py: config -> model -> scheduler -> uvicorn; page.html: the chat page at GET /.
"""
