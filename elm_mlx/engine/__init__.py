"""The decoding engine: generation options, samplers and stops, KV caches, the reference step
loop, speculation, the scheduler of rows, and the front-ends over it (stream/generate,
batch_generate, the chat session, the prompt cache)."""
