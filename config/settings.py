"""This deployment's settings: the library's Settings, read once from the POSTROOM_* variables.

The fields, their variables and defaults live in ``postroom/settings.py`` (and the README's table).
"""

from postroom.settings import Settings, documented, env_name

__all__ = ["Settings", "documented", "env_name", "settings"]

settings = Settings()
