"""
What several benchmark scripts share: machine facts, load, process status, a progress line.

Scripts import it as a sibling (``benchmarks/`` is put on sys.path by the script itself, so
``python -P benchmarks/x.py`` works too).
"""

from __future__ import annotations

import os
from pathlib import Path
import platform
import subprocess
import sys
import time


LICENSES = Path('/usr/share/common-licenses')  # real English text on every Debian/Ubuntu box


def licence_words() -> list:
    """Return the words of the system's licence texts: prompt material that needs no download."""
    return ' '.join(
        p.read_text(errors='replace') for p in sorted(LICENSES.glob('*')) if p.is_file()
    ).split()


def load1() -> float:
    """Return the 1-minute load average (NaN where the OS has none): other work on the box."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float('nan')


def wait_for_quiet(limit: float, minutes: int = 5, say=print) -> float:
    """Wait (at most ``minutes``, checking each minute) for a 1-minute load under ``limit``."""
    for _ in range(minutes):
        if load1() <= limit:
            break
        say(f'load {load1()} > {limit}: waiting 60 s')
        time.sleep(60)
    return load1()


def cpu_info() -> dict:
    """Return the CPU's name, its AVX2 / AVX-512 flags and torch's kernel level."""
    import torch

    name, flags = '', set()
    try:
        with open('/proc/cpuinfo') as fh:
            for line in fh:
                key, _, val = line.partition(':')
                if key.strip() == 'model name':
                    name = val.strip()
                elif key.strip() == 'flags':
                    flags |= set(val.split())
    except OSError:
        pass
    name = name or platform.processor()
    return {
        'model_name': name,
        'avx2': 'avx2' in flags,
        'avx512f': 'avx512f' in flags,
        'cpus': os.cpu_count(),
        'torch_capability': torch.backends.cpu.get_cpu_capability(),
    }


def uptime() -> str:
    """Return ``uptime``'s line: the load over 1, 5 and 15 minutes, for the report."""
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f'load average {os.getloadavg()}'


def proc_status(pid: int | str = 'self') -> dict:
    """Return a process's thread count, resident memory and its peak (KiB) ({} once gone)."""
    out = {}
    try:
        with open(f'/proc/{pid}/status') as fh:
            for line in fh:
                key, _, val = line.partition(':')
                if key in ('Threads', 'VmRSS', 'VmHWM'):
                    out[key] = int(val.split()[0])
    except OSError:
        pass
    return out


def reset_peak() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS; False where Linux can't."""
    try:
        with open('/proc/self/clear_refs', 'w') as fh:
            fh.write('5')
        return True
    except OSError:
        return False


def mem_available() -> int:
    """Return MemAvailable from /proc/meminfo in bytes (0 where there is none)."""
    try:
        with open('/proc/meminfo') as fh:
            for line in fh:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Plain:
    def __init__(self, total, quiet=False):
        self.n, self.total, self.quiet = 0, total, quiet

    def __call__(self, what):
        self.n += 1
        if not self.quiet:
            print(f'[{self.n}/{self.total}] {what}', file=sys.stderr, flush=True)

    def close(self):
        pass


class _Bar:
    def __init__(self, bar):
        self.bar, self.started = bar, False

    def __call__(self, what):
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(what)

    def close(self):
        if self.started:
            self.bar.update()
        self.bar.close()


def progress(total: int, enabled: bool, desc: str):
    """Return ``step(what)`` / ``.close()``: a tqdm bar, plain lines without tqdm, or nothing."""
    if not enabled:
        return _Plain(total, quiet=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(total)
    return _Bar(tqdm(total=total, desc=desc, unit='step', file=sys.stderr))
