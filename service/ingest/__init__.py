"""Ingestion: the batch, record validation, the quality screen, record dedup, the write pipeline, streams."""
