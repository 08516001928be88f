"""The migration's state, kept in the target database (schema ``orchestrate``)."""
