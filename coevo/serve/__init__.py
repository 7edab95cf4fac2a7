"""The Service: a strategy's cloud side over HTTP (FastAPI, SQLite) and the device runtime."""

from coevo.serve.app import create_app
from coevo.serve.device import DeviceError, DeviceReport, DeviceRuntime, run_device
from coevo.serve.launch import app_from_config, launch_devices, run_server
from coevo.serve.rounds import CheckIn, Coordinator, Rejected
from coevo.serve.settings import (
    ServeConfig,
    ServeSettings,
    Service,
    build_service,
    load_serve_config,
    parse_serve_config,
)
from coevo.serve.store import Store, StoredUpdate
from coevo.serve.wire import WireError, decode_payload, encode_payload, parse_update

__all__ = [
    "CheckIn",
    "Coordinator",
    "DeviceError",
    "DeviceReport",
    "DeviceRuntime",
    "Rejected",
    "ServeConfig",
    "ServeSettings",
    "Service",
    "Store",
    "StoredUpdate",
    "WireError",
    "app_from_config",
    "build_service",
    "create_app",
    "decode_payload",
    "encode_payload",
    "launch_devices",
    "load_serve_config",
    "parse_serve_config",
    "parse_update",
    "run_device",
    "run_server",
]
