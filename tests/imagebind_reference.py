"""Test-only access to Meta's ImageBind reference code (`imagebind-unofficial`), used as a parity oracle.

The installed package cannot be imported normally: `imagebind/__init__.py` imports `imagebind.data`, which pulls
`pytorchvideo`, which imports `torchvision.transforms.functional_tensor` (removed from torchvision). Its model
modules need none of that, so they are loaded under a bare `imagebind` package object. Its preprocessing module
is loaded with two shims (see shared/ENVIRONMENT.md). The reference code is CC-BY-NC-SA: it is only imported by
tests, never vendored.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch


def _ensure_imagebind_package() -> None:
    """Registers `imagebind` in `sys.modules` without running its `__init__` (skips the test if not installed)."""
    if "imagebind" in sys.modules:
        return
    spec = importlib.util.find_spec("imagebind")  # finding a top-level package does not execute it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("Meta's ImageBind reference (`imagebind-unofficial`) is not installed", allow_module_level=True)
    package = types.ModuleType("imagebind")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["imagebind"] = package


def _import_or_skip(name: str) -> types.ModuleType:
    _ensure_imagebind_package()
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"cannot import Meta's reference `{name}`: {error}", allow_module_level=True)


def load_reference_model_module() -> types.ModuleType:
    """Returns Meta's `imagebind.models.imagebind_model` module (skips the calling test if unavailable)."""
    return _import_or_skip("imagebind.models.imagebind_model")


def _load_audio_with_soundfile(path) -> tuple[torch.Tensor, int]:
    """`torchaudio.load` replacement for the reference: (channels, frames) float32 in [-1, 1] and the rate."""
    import soundfile

    data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sample_rate


class _TorchaudioWithSoundfileLoad(types.ModuleType):
    """Stands in for `torchaudio` inside the reference's data module only: `load` reads with soundfile
    (torchaudio 2.9+ needs torchcodec/FFmpeg for it); everything else is torchaudio's own."""

    def __init__(self, torchaudio_module: types.ModuleType):
        super().__init__("torchaudio")
        self._torchaudio = torchaudio_module
        self.load = _load_audio_with_soundfile

    def __getattr__(self, name: str):
        return getattr(self._torchaudio, name)


def import_reference_data_module() -> types.ModuleType:
    """Returns Meta's `imagebind.data` (preprocessing) with the shims installed (skips if unavailable).

    Shims: `torchvision.transforms.functional_tensor` is aliased to `torchvision.transforms.functional` (pytorchvideo
    imports the removed module), and the module's `torchaudio` is replaced by a proxy whose `load` uses soundfile.
    The torchaudio shim is scoped to the reference module; the global `torchaudio` is left untouched.
    """
    try:
        import torchaudio
        import torchvision.transforms.functional
    except ImportError as error:
        pytest.skip(f"the ImageBind reference preprocessing needs torchvision and torchaudio: {error}")
    sys.modules.setdefault("torchvision.transforms.functional_tensor", torchvision.transforms.functional)
    data_module = _import_or_skip("imagebind.data")
    if not isinstance(data_module.torchaudio, _TorchaudioWithSoundfileLoad):
        data_module.torchaudio = _TorchaudioWithSoundfileLoad(torchaudio)
    return data_module
