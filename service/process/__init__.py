"""The process: server entrypoint, multi-process supervisor, systemd notify, TLS."""
