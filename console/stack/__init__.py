"""The embedded stack: starts, checks and stops Temporal, both sandboxes and the worker locally.

`up`, `down` and `status` (lifecycle) drive the components (components) as supervised
processes (processes); the Temporal dev server's command line and its admin calls are in
devserver.
"""

from __future__ import annotations

from console.stack.components import (
    COMPONENTS,
    HOST,
    ComponentState,
    ComponentStatus,
    StackError,
    free_ports,
    private_settings,
    settings_env,
    stack_env,
)
from console.stack.devserver import (
    DEV_SERVER_DYNAMIC_CONFIG,
    DEV_SERVER_PRAGMAS,
    dev_server_argv,
    temporal_binary,
)
from console.stack.lifecycle import down, status, up
from console.stack.processes import private_directory, private_log

__all__ = [
    "COMPONENTS",
    "DEV_SERVER_DYNAMIC_CONFIG",
    "DEV_SERVER_PRAGMAS",
    "HOST",
    "ComponentState",
    "ComponentStatus",
    "StackError",
    "dev_server_argv",
    "down",
    "free_ports",
    "private_directory",
    "private_log",
    "private_settings",
    "settings_env",
    "stack_env",
    "status",
    "temporal_binary",
    "up",
]
