"""Wire types: the msgspec Structs that validate requests and shape responses.

They are the single source of validation and of the OpenAPI document.
"""
