"""Plugins: one per model domain, found through the ``polyquant.plugins`` entry-point group.

    from polyquant.plugins import discover, load, get_method

    discover()                       # {"vit": PluginInfo(...), ...}; never raises
    get_method("vit", "adalog")      # AdaLogConfig: imports the plugin's impl module on first use

Importing this package is cheap: it reads no entry points and imports no plugin or heavy dependency.
The contract a plugin implements is documented in ``polyquant.plugins._registry``.
"""

from ._registry import (
    API_VERSION,
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    PluginInfo,
    PluginLoadError,
    PluginSpec,
    RequirementStatus,
    check_requirements,
    clear_cache,
    discover,
    get_demo,
    get_info,
    get_method,
    load,
    load_cli,
)

__all__ = [
    "API_VERSION",
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "PluginLoadError",
    "PluginSpec",
    "RequirementStatus",
    "check_requirements",
    "clear_cache",
    "discover",
    "get_demo",
    "get_info",
    "get_method",
    "load",
    "load_cli",
]
