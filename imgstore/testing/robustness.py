"""``StoreRobustness``: every robustness suite in one class, for a backend's tests beside ``StoreConformance``."""

from __future__ import annotations

from imgstore.testing.concurrency import ConcurrentAccess
from imgstore.testing.crash import CrashSafety
from imgstore.testing.faults import FaultTolerance
from imgstore.testing.fuzz import DamageDetection


class StoreRobustness(CrashSafety, FaultTolerance, DamageDetection, ConcurrentAccess):
    """Crashes (SIGKILL), write failures and full disks, damaged files, concurrent processes."""
