"""
The one build recipe of the decode kernels: a compile and a link command per CPU ISA.

colcon (``CMakeLists.txt``), ``make kernels`` (the pip path) and the run-time fallback in
``__init__.py`` all build through :func:`build_variant`, so the flags exist once and a library
built by one route is bit-for-bit what another would build. The commands come from the torch of
the Python that runs this file (its headers, libraries and ABI), never from ninja's cache, so
two callers cannot rebuild each other's library.

Layout of a build: ``<out>/<tag>/timebill_decode_<isa>.so`` plus ``manifest.json``, where the
tag names the Python ABI and the torch version the libraries are linked against. CMake runs this
file as a script before the package is importable, hence no package-relative imports.

    python build.py --out DIR [--reuse DIR ...] [--isa avx2 ...]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import fcntl
import hashlib
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional

SOURCE = Path(__file__).with_name('decode_cpu.cpp')
MANIFEST = 'manifest.json'

# ISA -> (compiler flags, /proc/cpuinfo flags the code then needs), most capable first: the
# loader takes the first one the CPU runs. avx512 is Zen 4 / Sapphire Rapids (VNNI + BF16);
# AVX-512 CPUs without them (Skylake-X) take avx2.
VARIANTS = {
    'avx512': (
        ['-mavx2', '-mfma', '-mf16c', '-mavx512f', '-mavx512bw', '-mavx512dq', '-mavx512vl',
         '-mavx512vnni', '-mavx512bf16'],
        ['avx2', 'fma', 'f16c', 'avx512f', 'avx512bw', 'avx512dq', 'avx512vl', 'avx512_vnni',
         'avx512_bf16'],
    ),
    # F16C (every AVX2 CPU has it) widens an fp16 KV cache in the attention
    'avx2': (['-mavx2', '-mfma', '-mf16c'], ['avx2', 'fma', 'f16c']),
}
# cpp_extension's own flags for a CPU extension, with -O3 and OpenMP for at::parallel_for
BASE_FLAGS = ['-O3', '-fPIC', '-std=c++20', '-fopenmp', '-DTORCH_API_INCLUDE_EXTENSION_H']


def module_name(isa: str) -> str:
    """Name the Python module of one variant (its PyInit_ symbol, so one name per ISA)."""
    return f'timebill_decode_{isa}'


def abi_tag() -> str:
    """Name what a library is bound to: the Python ABI and the exact torch version."""
    import torch

    return f"{sysconfig.get_config_var('SOABI')}-torch{torch.__version__}"


def source_sha() -> str:
    """Hash the C++ source: a library built from another version of it is stale."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def openmp_runtime() -> str:
    """
    Return the OpenMP runtime torch itself loaded (its bundled libgomp, or libiomp/libomp).

    The kernels' ``at::parallel_for`` must share torch's thread pool: linking the compiler's
    own libgomp would work only while its soname happens to match the one torch loaded.
    """
    import torch  # noqa: F401 - loads libtorch and with it the runtime we look for

    with open('/proc/self/maps') as maps:
        for line in maps:
            path = line.split(None, 5)[-1].strip()
            name = os.path.basename(path)
            if name.startswith(('libgomp', 'libiomp', 'libomp')) and '.so' in name:
                return path
    raise RuntimeError('torch loaded no OpenMP runtime (a build without OpenMP?)')


def commands(isa: str, obj: str, out: str) -> tuple[list[str], list[str]]:
    """Return the compile and the link command of one variant."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get('CXX', 'c++')
    includes = include_paths('cpu') + [sysconfig.get_path('include', scheme='posix_prefix')]
    compile_cmd = [
        cxx, *BASE_FLAGS, *VARIANTS[isa][0],
        f'-DTORCH_EXTENSION_NAME={module_name(isa)}',
        f'-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}',
        *[f'-isystem{p}' for p in includes], '-c', str(SOURCE), '-o', obj,
    ]
    # no -fopenmp here: it would add the compiler's -lgomp; torch's runtime is linked by path
    omp = openmp_runtime()
    libdirs = library_paths('cpu')
    link_cmd = [
        cxx, '-shared', obj, '-o', out, *[f'-L{d}' for d in libdirs],
        '-lc10', '-ltorch_cpu', '-ltorch', '-ltorch_python', omp,
        *[f'-Wl,-rpath,{d}' for d in dict.fromkeys(libdirs + [os.path.dirname(omp)])],
    ]
    return compile_cmd, link_cmd


def variant_key(isa: str) -> str:
    """Hash what decides a variant's bytes: its commands (output paths left out) and source."""
    cmds = commands(isa, '@OBJ', '@OUT')
    blob = json.dumps([cmds, source_sha()]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_variant(isa: str, out_dir: Path) -> Path:
    """Compile one variant into ``out_dir`` (atomically); raise with the compiler's message."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f'{module_name(isa)}.so'
    with tempfile.TemporaryDirectory(dir=out_dir, prefix='.tmp-') as tmp:
        obj, lib = os.path.join(tmp, 'decode_cpu.o'), os.path.join(tmp, target.name)
        for cmd in commands(isa, obj, lib):
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                tail = (run.stderr or run.stdout).strip().splitlines()[-6:]
                raise RuntimeError(f'{cmd[0]} failed for {isa}: ' + ' | '.join(tail))
        os.replace(lib, target)
    return target


def read_manifest(tag_dir: Path) -> Optional[dict]:
    """Return a build's manifest, or None where there is none (or it is unreadable)."""
    try:
        return json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _current(manifest: Optional[dict], tag_dir: Path, isa: str, key: str) -> Optional[Path]:
    entry = (manifest or {}).get('variants', {}).get(isa)
    path = tag_dir / entry['file'] if entry else None
    return path if entry and entry.get('key') == key and path.is_file() else None


def build(out: Path, isas=None, reuse=(), log=print) -> dict:
    """
    Build every variant into ``out/<tag>/`` unless it is current; return the manifest.

    A variant whose compiler flags this compiler rejects is skipped with a message (the
    manifest lists it under ``skipped``). ``reuse``: other build roots whose identical
    libraries (same key) are copied instead of compiled, e.g. ``make kernels``' for colcon.
    """
    tag = abi_tag()
    tag_dir = Path(out) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    with open(tag_dir / '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two builds into one folder take turns
        old = read_manifest(tag_dir)
        manifest = {'tag': tag, 'source_sha256': source_sha(), 'variants': {}, 'skipped': {}}
        todo = []
        for isa in isas or list(VARIANTS):
            key = variant_key(isa)
            entry = {'file': f'{module_name(isa)}.so', 'key': key, 'cpu_flags': VARIANTS[isa][1]}
            if _current(old, tag_dir, isa, key):
                manifest['variants'][isa] = entry
                continue
            for root in reuse:
                found = _current(read_manifest(Path(root) / tag), Path(root) / tag, isa, key)
                if found:
                    shutil.copy2(found, tag_dir / entry['file'])
                    manifest['variants'][isa] = entry
                    log(f'[kernels] {isa}: copied the identical build from {found}')
                    break
            else:
                todo.append((isa, entry))

        def one(item):
            isa, entry = item
            log(f'[kernels] compiling {isa} ({tag}) ...')
            try:
                build_variant(isa, tag_dir)
                return isa, entry, None
            except (RuntimeError, OSError) as exc:
                return isa, entry, str(exc)[:600]

        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for isa, entry, error in pool.map(one, todo):
                if error:
                    manifest['skipped'][isa] = error
                    log(f'[kernels] skipped {isa}: the compiler cannot build it: {error}')
                else:
                    manifest['variants'][isa] = entry
        (tag_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
    built = ', '.join(manifest['variants']) or 'none'
    log(f'[kernels] {tag_dir}: {built}')
    return manifest


def main(argv=None) -> int:
    """Build the variants into a folder (colcon's build tree or the package tree)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, type=Path)
    parser.add_argument('--reuse', action='append', default=[], type=Path)
    parser.add_argument('--isa', action='append', choices=list(VARIANTS))
    args = parser.parse_args(argv)
    manifest = build(args.out, args.isa, args.reuse)
    return 0 if manifest['variants'] else 1


if __name__ == '__main__':
    sys.exit(main())
