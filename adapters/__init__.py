"""Platform adapters: each turns its platform's events into ``IncomingMessage`` and
implements ``ReplySink``."""
