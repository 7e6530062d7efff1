"""edge-sleep: on-device continual learning with Synaptic Sleep Replay.

Learn by day through low-rank adapters and an on-disk replay store; consolidate by night with
noisy replay, Fisher significance, pruning and strengthening.
"""

from edge_sleep.config import PrivacyConfig, SleepConfig, StoreConfig, WakeConfig
from edge_sleep.errors import (
    CallOrderError,
    ConfigError,
    CorruptRecordError,
    EdgeSleepError,
    FingerprintMismatchError,
    FormatVersionError,
    InputError,
    StoreError,
    StorePathError,
)
from edge_sleep.runtime import EdgeSleep
from edge_sleep.schedule import AdaptivePolicy, Decision, DeviceState, IdleAndCharging, SleepPolicy, SleepPressure
from edge_sleep.sleep import SleepReport
from edge_sleep.store import ReplayBatch, ReplayStore
from edge_sleep.wake import WakeStats

__version__ = "0.1.0"

__all__ = [
    "EdgeSleep",
    "WakeConfig",
    "SleepConfig",
    "StoreConfig",
    "PrivacyConfig",
    "ReplayStore",
    "ReplayBatch",
    "WakeStats",
    "SleepReport",
    "DeviceState",
    "SleepPolicy",
    "SleepPressure",
    "Decision",
    "IdleAndCharging",
    "AdaptivePolicy",
    "EdgeSleepError",
    "ConfigError",
    "InputError",
    "StoreError",
    "StorePathError",
    "FingerprintMismatchError",
    "FormatVersionError",
    "CorruptRecordError",
    "CallOrderError",
]
