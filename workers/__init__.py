"""Worker actors: each owns one task and one bounded mailbox; none knows about HTTP."""
