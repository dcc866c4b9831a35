"""`glm4v serve`: the model behind an OpenAI-compatible HTTP API (docs/serving.md).

    protocol.py   the wire format: request schema, error body, response and chunk objects
    prompts.py    OpenAI messages -> the model's prompt (roles, images, token budget)
    batcher.py    the model thread: a bounded queue, run-to-completion batches
    app.py        the FastAPI routes, streaming, timeouts, disconnects
    cli.py        the command (flags, loading, uvicorn, SIGTERM)

Needs the `serve` extra (fastapi, uvicorn); nothing is imported here, so the package stays cheap.
"""
