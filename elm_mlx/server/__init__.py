"""`elm serve`: an OpenAI- and Anthropic-compatible HTTP server (Starlette + uvicorn) above the
engine.

protocol.py reads and checks chat and completion bodies; responses.py writes the OpenAI
response and stream-chunk shapes; responses_api.py (OpenAI Responses), anthropic.py (Messages)
and embeddings_api.py turn their APIs' bodies into jobs and write their answers; worker.py owns
one model's engine (`elm_mlx.engine.scheduler.BatchGenerator`, continuous batching with a
prompt cache shared across requests) in one thread; pool.py loads and unloads the served
models; metrics.py counts for /metrics; guards.py stands in front of every route; app.py is
the ASGI application; run.py binds a socket and serves it with uvicorn.
"""
