"""The HTTP front end: app factory, middlewares, routes and the command line."""
