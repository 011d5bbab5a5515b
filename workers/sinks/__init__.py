"""Record sinks: the Kafka writer, the embedded local log, and the spilling sink between them."""
