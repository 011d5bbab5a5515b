"""The HTTP front end: app factory, middlewares, routes and the command line."""

__version__ = "0.1.0"
