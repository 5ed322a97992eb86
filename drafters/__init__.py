"""specjax.drafters."""
