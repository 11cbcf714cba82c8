"""`elm serve`: an OpenAI-compatible HTTP server (Starlette + uvicorn) above the engine.

protocol.py reads and checks request bodies; responses.py writes the OpenAI response and
stream-chunk shapes; worker.py owns the engine (`elm_mlx.engine.scheduler.BatchGenerator`, continuous
batching with a prompt cache shared across requests) in one thread; app.py is the ASGI
application; run.py binds a socket and serves it with uvicorn.
"""
