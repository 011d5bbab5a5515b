"""Configuration: the Settings struct and how it is read from the environment."""

from mlgate.config.settings import (
    Settings,
    SettingsError,
    env_name,
    load_settings,
    orphaned_workers,
    worker_data_dir,
)

__all__ = ["Settings", "SettingsError", "env_name", "load_settings", "orphaned_workers", "worker_data_dir"]
