"""Plan generation: the planning prompts, parsing and repair, and the LLM providers."""
