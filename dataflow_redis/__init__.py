"""dataflow-redis: a Redis control plane for split rollout/training LLM pipelines.

Start with :class:`ControlPlane`; docs/design.md maps every public method to the Lua
script it runs and every key that script touches.
"""

from .capacity import CapacityReport, CapacityReporter
from .config import BackpressureConfig, RunSettings
from .control_plane import ControlPlane, connect
from .errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    DataflowError,
    InvalidArgument,
    OutOfMemory,
    RecordTooLarge,
    ScriptError,
    StepRegression,
    UnknownRun,
    WritesRefused,
)
from .records import FeatureSpec, PromptTask, SampleRef
from .rollout import RolloutWorker
from .trainer import Trainer

__version__ = "0.3.0"

__all__ = [
    "AuthenticationFailed", "BackpressureConfig", "CapacityReport", "CapacityReporter",
    "ConfigError", "ConnectionFailed", "ControlPlane", "DataflowError", "FeatureSpec",
    "InvalidArgument", "OutOfMemory", "PromptTask", "RecordTooLarge", "RolloutWorker", "RunSettings",
    "SampleRef", "ScriptError", "StepRegression", "Trainer", "UnknownRun", "WritesRefused", "connect",
]
