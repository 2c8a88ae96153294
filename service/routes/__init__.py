"""Routes, one module per group; each exposes ``router`` and, where it owns resources,
``lifespan(app)``."""
