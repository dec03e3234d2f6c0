"""Where plans live: the store protocol (`base`), an in-memory store (`memory`) and SQLite (`sqlite`, whose
run queue is `sqlite_queue`; `sqlite_common` holds what the two share)."""
