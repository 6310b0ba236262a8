"""
The engine's own CPU decode kernels (``decode_cpu.cpp``), built on first use.

A decode step is one activation row against every weight: on CPUs without AVX-512 torch's int4
kernel is compute-bound there (its fast path wants AVX-512 and bf16). The C++ file multiplies
int16-quantised activations with 4- and 8-bit weights by integer multiply-adds, runs one-token
attention reading the cache once, and chains a Llama-family layer stack into one call
(``fast_decode.py``). It is compiled with the system's C++ compiler the
first time it is needed (~1 min) into the cache folder; where that cannot happen (no compiler,
no AVX2/FMA, ``TIMEBILL_KERNELS=0``) ``load()`` returns None and the engine keeps torch's
kernels, with the reason logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
import sys
import threading
from typing import Optional

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name('decode_cpu.cpp')
_lock = threading.Lock()
_state: dict = {}


def cpu_supports() -> Optional[str]:
    """Return None if this CPU runs the kernels, else why not."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ('AVX2', 'AVX512'):
        return f'CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2)'
    try:
        flags = Path('/proc/cpuinfo').read_text().split('flags', 2)[1].split('\n', 1)[0].split()
    except (OSError, IndexError):
        return None  # torch saw AVX2; trust it
    missing = [f for f in ('avx2', 'fma') if f not in flags]
    return f'CPU lacks {missing}' if missing else None


def load():
    """Return the compiled kernel module, or None (reason in ``why_not()``)."""
    with _lock:
        if 'module' in _state:
            return _state['module']
        module, why = None, None
        if os.environ.get('TIMEBILL_KERNELS', '1') == '0':
            why = 'TIMEBILL_KERNELS=0'
        else:
            why = cpu_supports()
        if why is None:
            try:
                module = _build()
            except Exception as exc:  # noqa: BLE001 - any build failure means: use torch's
                why = f'could not build the kernels: {type(exc).__name__}: {exc}'.strip()[:400]
        if why:
            _log.warning('timebill decode kernels off (%s); using torch kernels', why)
        _state['module'], _state['why'] = module, why
        return module


def why_not() -> Optional[str]:
    """Return why ``load()`` gave None (None if it gave the kernels or was not called)."""
    return _state.get('why')


def _build():
    import torch
    from torch.utils.cpp_extension import load as load_extension

    from ..config import cache_dir

    source = _SOURCE.read_bytes()
    tag = hashlib.sha1(source + torch.__version__.encode()).hexdigest()[:12]
    build = cache_dir() / 'kernels' / tag
    build.mkdir(parents=True, exist_ok=True)
    # compile a copy inside the build folder: the same file path whichever copy of the package
    # imports it (source tree, colcon install), else each path would rebuild the other's
    copy = build / _SOURCE.name
    if not copy.is_file() or copy.read_bytes() != source:
        tmp = copy.with_name(f'{copy.name}.{os.getpid()}.tmp')
        tmp.write_bytes(source)
        tmp.replace(copy)
    # torch runs `ninja` from PATH: the venv's (requirements.txt) where the system has none
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get('PATH', '').split(os.pathsep):
        os.environ['PATH'] = os.pathsep.join(filter(None, [os.environ.get('PATH'), bindir]))
    return load_extension(
        name=f'timebill_decode_cpu_{tag}',
        sources=[str(copy)],
        build_directory=str(build),
        extra_cflags=['-O3', '-mavx2', '-mfma', '-fopenmp'],
        extra_ldflags=['-fopenmp'],
        verbose=False,
    )
