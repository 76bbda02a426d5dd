"""ONNX Runtime sessions for model packages, created once per model and reused.

onnxruntime-gpu lists the TensorRT and CUDA providers even on a machine where
they cannot load, and then falls back quietly; so every session logs the
providers it actually got, and callers can see them on `OrtModel.providers`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import Package, PackageError

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    intra_op_threads: int = 0  # 0: ONNX Runtime decides
    inter_op_threads: int = 0
    cache_dir: Path | None = None  # TensorRT engine cache, so engines are built once per model


@functools.cache
def unusable_reason(short: str) -> str | None:
    """Why a GPU provider cannot load on this machine (its CUDA libraries are missing), or None.

    Asked before a session is made, so ONNX Runtime does not print a page of errors
    for each session on a machine without CUDA. CUDA libraries installed from PyPI
    (the nvidia-* packages) are found through onnxruntime.preload_dlls().
    """
    if short == "cpu":
        return None
    import ctypes
    import importlib.util
    import os

    import onnxruntime as ort

    capi = os.path.join(os.path.dirname(ort.__file__), "capi")

    def load() -> str | None:
        try:
            ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(os.path.join(capi, f"libonnxruntime_providers_{short}.so"))
            return None
        except OSError as exc:
            return str(exc)

    reason = load()
    if reason and importlib.util.find_spec("nvidia") is not None and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
        reason = load()
    return reason


def _provider_list(options: RuntimeOptions) -> list[str | tuple[str, dict[str, object]]]:
    """ONNX Runtime's providers for `options`: those that can load here; TensorRT with its engine cache."""
    providers: list[str | tuple[str, dict[str, object]]] = []
    for short in options.providers:
        if unusable_reason(short):
            continue
        name = PROVIDER_NAMES[short]
        if short == "tensorrt" and options.cache_dir:
            options.cache_dir.mkdir(parents=True, exist_ok=True)
            providers.append((name, {"trt_engine_cache_enable": True, "trt_fp16_enable": False,
                                     "trt_engine_cache_path": str(options.cache_dir)}))
        else:
            providers.append(name)
    return providers


class OrtModel:
    """One package's ONNX Runtime session and what is needed to feed it."""

    def __init__(self, package: Package, precision: str, options: RuntimeOptions):
        import onnxruntime as ort

        self.package = package
        self.precision = precision
        self.sha256 = package.manifest.sha256_for(precision)
        path = package.onnx_path(precision)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.log_severity_level = 3
        ort.set_default_logger_severity(3)  # provider fallbacks are reported below, once, by us
        started = time.perf_counter()
        try:
            self.ort_session = ort.InferenceSession(str(path), session_options,
                                                    providers=_provider_list(options))
        except Exception as exc:  # ORT raises its own exception types for a bad file
            raise PackageError(f"model {package.name}: ONNX Runtime cannot load {path}: {exc}") from None
        self.load_seconds = time.perf_counter() - started
        self.providers = self.ort_session.get_providers()
        self.input_name = self.ort_session.get_inputs()[0].name
        wanted = [PROVIDER_NAMES[p] for p in options.providers]
        missing = [p for p in wanted if p not in self.providers]
        reasons = {PROVIDER_NAMES[p]: unusable_reason(p) for p in options.providers}
        log.log(logging.WARNING if missing and wanted[0] not in self.providers else logging.INFO,
                "model %s %s (%s) runs on %s%s", package.name, package.manifest.version, precision,
                ", ".join(self.providers),
                f"; not available here: {', '.join(missing)}" if missing else "")
        for name in missing:
            if reasons.get(name):
                log.info("%s cannot load: %s", name, reasons[name])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output for a batch already in its input layout, as float32."""
        try:
            out = self.ort_session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        except Exception as exc:  # ONNX Runtime's own exception types are not importable stably
            raise InferenceError(f"ONNX Runtime failed running {self.package.name}: {exc}") from exc
        return out[0].astype(np.float32, copy=False)


class InferenceError(Exception):
    """ONNX Runtime failed on a batch (out of memory, a provider error): it may pass, so the job is
    tried again."""


class OrtSessions:
    """The process's sessions: one per (model, precision), created on first use, and again when
    the package was rebuilt meanwhile (the service keeps running across `machaon models build`)."""

    def __init__(self, options: RuntimeOptions):
        self.options = options
        self._models: dict[tuple[str, str], OrtModel] = {}
        self._lock = threading.Lock()

    def get(self, package: Package, precision: str = "fp32") -> OrtModel:
        key = (package.name, precision)
        with self._lock:  # creating a session takes seconds; two threads must not both do it
            model = self._models.get(key)
            if model is None or model.sha256 != package.manifest.sha256_for(precision):
                if model is not None:
                    log.info("model %s was rebuilt (version %s, now %s): loading it again", package.name,
                             model.package.manifest.version, package.manifest.version)
                model = self._models[key] = OrtModel(package, precision, self.options)
            return model

    def loaded(self) -> dict[tuple[str, str], list[str]]:
        """The providers each loaded session got, by (model, precision): what operators are shown."""
        # No lock: get() holds it for the seconds a session takes to load, and copying the
        # dict is atomic under the GIL.
        return {key: list(model.providers) for key, model in dict(self._models).items()}
