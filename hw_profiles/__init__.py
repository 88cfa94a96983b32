"""Device profiles (TOML data), TVM RPC devices, and the measurement protocol; no torch."""

from __future__ import annotations

from hw_profiles.devices import (
    CheckResult,
    build_probe_library,
    check_device,
    format_check,
    format_devices,
    format_profile,
    format_profile_table,
)
from hw_profiles.measure import (
    KernelCall,
    LayerTimes,
    Measurement,
    measure_layers,
    measure_library,
)
from hw_profiles.profiles import Profile, ProfileError, Protocol, list_profiles, load_profile
from hw_profiles.rpc import (
    DeviceError,
    Tracker,
    check_tracker,
    local_server,
    local_tracker,
    parse_tracker,
    request_session,
    tracker_summary,
)

__all__ = [
    "CheckResult",
    "DeviceError",
    "KernelCall",
    "LayerTimes",
    "Measurement",
    "Profile",
    "ProfileError",
    "Protocol",
    "Tracker",
    "build_probe_library",
    "check_device",
    "check_tracker",
    "format_check",
    "format_devices",
    "format_profile",
    "format_profile_table",
    "list_profiles",
    "load_profile",
    "local_server",
    "local_tracker",
    "measure_layers",
    "measure_library",
    "parse_tracker",
    "request_session",
    "tracker_summary",
]
