"""Where plans live: the store protocol (`base`), an in-memory store (`memory`) and SQLite (`sqlite`)."""
