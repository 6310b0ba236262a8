"""
The engine's own CPU decode kernels (``decode_cpu.cpp``), built by the workspace build.

A decode step is one activation row against every weight: on CPUs without AVX-512 torch's int4
kernel is compute-bound there (its fast path wants AVX-512 and bf16). The C++ file multiplies
int16-quantised activations with 4- and 8-bit weights by integer multiply-adds, runs one-token
attention reading the cache once, and chains a Llama-family layer stack into one call
(``fast_decode.py``).

``colcon build`` and ``make kernels`` compile one library per ISA (``build.py``, the one recipe)
into ``timebill_ros/_kernels/<python ABI>-torch<version>/``; ``load()`` imports the prebuilt
library of the best ISA this CPU runs. Only where none fits (another torch, a stale source, a
tree nobody built) does it compile the same recipe into the cache, with a warning saying why;
the cache folder is keyed by the commands, so callers never rebuild each other's library.
Where no library can exist (no AVX2/FMA, ``TIMEBILL_KERNELS=0``, no compiler) ``load()``
returns None and the engine keeps torch's kernels, with the reason logged once.
``TIMEBILL_KERNELS_ISA=avx2`` forces a variant (to compare them on one machine).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
from pathlib import Path
import threading
import time
from typing import Optional

from . import build as recipe

_log = logging.getLogger(__name__)
_SOURCE = recipe.SOURCE
_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> Optional[set]:
    try:
        text = Path('/proc/cpuinfo').read_text()
        return set(text.split('flags', 2)[1].split('\n', 1)[0].split(':', 1)[-1].split())
    except (OSError, IndexError):
        return None


def cpu_supports() -> Optional[str]:
    """Return None if this CPU runs the kernels, else why not."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ('AVX2', 'AVX512'):
        return f'CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX2)'
    flags = _cpu_flags()
    if flags is None:
        return None  # torch saw AVX2; trust it
    missing = [f for f in ('avx2', 'fma', 'f16c') if f not in flags]
    return f'CPU lacks {missing}' if missing else None


def cpu_isas() -> list:
    """Return the variants this CPU runs, most capable first (``TIMEBILL_KERNELS_ISA`` picks)."""
    forced = os.environ.get('TIMEBILL_KERNELS_ISA')
    if forced:
        return [forced] if forced in recipe.VARIANTS else []
    flags = _cpu_flags()
    if flags is None:
        return ['avx2']
    return [isa for isa, (_, need) in recipe.VARIANTS.items() if set(need) <= flags]


def prebuilt_roots() -> list:
    """
    Return where prebuilt libraries are looked for, first match wins.

    ``timebill_ros/_kernels`` beside the imported package: colcon installs its build there (a
    real folder also in a symlink install, where ``core/`` links to the source), ``make
    kernels`` builds there in the source tree (pip path). The resolved path comes second: a
    symlink install then still finds the pip path's build.
    """
    here = Path(__file__).absolute().parents[2] / '_kernels'
    resolved = Path(__file__).resolve().parents[2] / '_kernels'
    return list(dict.fromkeys([here, resolved]))


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
            isas = cpu_isas()
            if why is None and not isas:
                why = f"no variant {os.environ['TIMEBILL_KERNELS_ISA']!r} (TIMEBILL_KERNELS_ISA)"
        if why is None:
            start = time.perf_counter()
            try:
                module, origin = _load_prebuilt(isas) or _load_jit(isas)
                origin['seconds'] = round(time.perf_counter() - start, 4)
                _state['origin'] = origin
                _log.info('timebill decode kernels: %s %s library %s loaded in %.3f s',
                          origin['source'], origin['isa'], origin['path'], origin['seconds'])
            except Exception as exc:  # noqa: BLE001 - any build failure means: use torch's
                why = f'could not build the kernels: {type(exc).__name__}: {exc}'.strip()[:400]
        if why:
            _log.warning('timebill decode kernels off (%s); using torch kernels', why)
        _state['module'], _state['why'] = module, why
        return module


def why_not() -> Optional[str]:
    """Return why ``load()`` gave None (None if it gave the kernels or was not called)."""
    return _state.get('why')


def origin() -> Optional[dict]:
    """
    Return where the loaded library came from: source, isa, tag, path, seconds (or None).

    ``source`` is ``prebuilt`` (the workspace build) or ``jit`` (compiled at run time).
    """
    return dict(_state['origin']) if 'origin' in _state else None


def describe() -> str:
    """Say in one line which kernels a process runs (for a node's configure log)."""
    info = origin()
    if info is None:
        return f"decode kernels off: {why_not() or 'not loaded'}"
    return (f"decode kernels: {info['source']} {info['isa']} library {info['path']} "
            f"(loaded in {info['seconds']:.3f} s)")


def _import(isa: str, path: Path):
    name = recipe.module_name(isa)
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _load_prebuilt(isas):
    import torch  # noqa: F401 - libtorch must be loaded before the library that links it

    tag, sha = recipe.abi_tag(), hashlib.sha256(_SOURCE.read_bytes()).hexdigest()
    for isa in isas:
        for root in prebuilt_roots():
            manifest = recipe.read_manifest(root / tag)
            entry = (manifest or {}).get('variants', {}).get(isa)
            path = root / tag / entry['file'] if entry else None
            if path and manifest.get('source_sha256') == sha and path.is_file():
                return _import(isa, path), {'source': 'prebuilt', 'isa': isa, 'tag': tag,
                                            'path': str(path)}
    return None


def _load_jit(isas):
    """Compile the recipe into the cache (the logged fallback); the best ISA that builds wins."""
    from ..config import cache_dir

    tag = recipe.abi_tag()
    roots = ', '.join(str(r) for r in prebuilt_roots())
    _log.warning('timebill decode kernels: no prebuilt library for %s/%s in %s (run colcon build '
                 'or make kernels); compiling it now (~1 min)', isas[0], tag, roots)
    errors = []
    for isa in isas:
        folder = cache_dir() / 'kernels' / tag / f'{isa}-{recipe.variant_key(isa)}'
        path = folder / f'{recipe.module_name(isa)}.so'
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process compiles, the others wait and load
            try:
                if not path.is_file():
                    recipe.build_variant(isa, folder)
            except (RuntimeError, OSError) as exc:
                errors.append(str(exc))
                _log.warning('timebill decode kernels: %s does not build here: %s', isa, exc)
                continue
        return _import(isa, path), {'source': 'jit', 'isa': isa, 'tag': tag, 'path': str(path)}
    raise RuntimeError('; '.join(errors))
