"""The plan language: the model, templates and their sandbox, validation. No I/O."""
