"""Route modules; each exposes ``setup(app)`` that adds its routes."""
