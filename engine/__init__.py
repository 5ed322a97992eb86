"""specjax.engine."""
