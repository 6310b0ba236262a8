"""
Crash recovery for MCAP bags: find the readable prefix of a bag whose writer died.

The recorder writes every message straight to the file, so a killed server leaves a bag with
complete records but no summary, footer or ``metadata.yaml``. This module checks whether a file
was closed, finds the last complete record, and either repairs the bag in place (``recover``,
like ``ros2 bag reindex``) or writes a repaired copy for the reader, so a bag still being
recorded is never modified by reading it.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import struct
from typing import Dict, Optional

MAGIC = b'\x89MCAP0\r\n'


def mcap_file(path: Path) -> Optional[Path]:
    """Find the bag's one ``.mcap`` file: ``path`` itself, or the only one in the directory."""
    if path.is_file():
        return path if path.suffix == '.mcap' else None
    files = sorted(path.glob('*.mcap'))
    return files[0] if len(files) == 1 else None


def mcap_is_complete(path: Path) -> bool:
    """Tell whether the file ends with an MCAP footer (its writer closed it)."""
    size = path.stat().st_size
    if size < 8 + 37:
        return False
    with path.open('rb') as fh:
        fh.seek(-37, 2)
        tail = fh.read(37)
    return tail[-8:] == MAGIC and tail[0] == 0x02


def valid_prefix(path: Path) -> int:
    """Byte length of the header plus every complete record before the first torn one."""
    with path.open('rb') as fh:
        data = fh.read()
    if not data.startswith(MAGIC):
        raise ValueError(f'{path} is not an MCAP file (bad magic)')
    pos, end = len(MAGIC), len(data)
    while pos + 9 <= end:
        op = data[pos]
        (length,) = struct.unpack_from('<Q', data, pos + 1)
        if op == 0 or pos + 9 + length > end:
            break
        pos += 9 + length
        if op in (0x0F, 0x02):  # data end / footer: the rest is the summary
            break
    return pos


def _footer_bytes() -> bytes:
    data_end = bytes([0x0F]) + struct.pack('<Q', 4) + struct.pack('<I', 0)
    footer = bytes([0x02]) + struct.pack('<Q', 20) + struct.pack('<QQI', 0, 0, 0)
    return data_end + footer + MAGIC


def _repaired_copy(src: Path, dst: Path) -> None:
    n = valid_prefix(src)
    with src.open('rb') as fi, dst.open('wb') as fo:
        fo.write(fi.read(n))
        fo.write(_footer_bytes())


def readable_copy(src: Path, dst: Path) -> None:
    """Copy an MCAP file to ``dst``, repaired (valid prefix + footer) when its writer died."""
    if mcap_is_complete(src):
        shutil.copyfile(src, dst)
    else:
        _repaired_copy(src, dst)


def recover(path: str | os.PathLike) -> Path:
    """
    Make a bag whose writer died readable in place (like ``ros2 bag reindex``).

    Keeps every complete record, appends a footer and writes ``metadata.yaml``. Returns the bag
    directory. Idempotent: a complete bag is left as it is.
    """
    path = Path(path)
    mcap = mcap_file(path)
    if mcap is None:
        raise FileNotFoundError(f'no single .mcap file in {path}')
    bagdir = mcap.parent
    if not mcap_is_complete(mcap):
        tmp = mcap.with_suffix('.mcap.recovering')
        _repaired_copy(mcap, tmp)
        tmp.replace(mcap)
    if not (bagdir / 'metadata.yaml').exists():
        _write_metadata(mcap)
    return bagdir


def _write_metadata(mcap: Path) -> None:
    from rosbags.highlevel import AnyReader
    from ruamel.yaml import YAML

    with AnyReader([mcap]) as reader:
        counts: Dict[int, int] = {}
        start, stop, total = 2**63 - 1, 0, 0
        for conn, ts, _ in reader.messages():
            counts[conn.id] = counts.get(conn.id, 0) + 1
            start, stop, total = min(start, ts), max(stop, ts), total + 1
        topics = [
            {
                'topic_metadata': {
                    'name': c.topic,
                    'type': c.msgtype,
                    'serialization_format': 'cdr',
                    'offered_qos_profiles': [],
                    'type_description_hash': reader.typestore.hash_rihs01(c.msgtype),
                },
                'message_count': counts.get(c.id, 0),
            }
            for c in reader.connections
        ]
    start = start if total else 0
    # fresh dicts each time: a shared object would be dumped as a YAML alias
    info = {
        'version': 9,
        'storage_identifier': 'mcap',
        'relative_file_paths': [mcap.name],
        'duration': {'nanoseconds': max(0, stop - start)},
        'starting_time': {'nanoseconds_since_epoch': start},
        'message_count': total,
        'topics_with_message_count': topics,
        'compression_format': '',
        'compression_mode': '',
        'files': [
            {
                'path': mcap.name,
                'starting_time': {'nanoseconds_since_epoch': start},
                'duration': {'nanoseconds': max(0, stop - start)},
                'message_count': total,
            }
        ],
        'custom_data': None,
        'ros_distro': 'rosbags',
    }
    yaml = YAML(typ='safe')
    yaml.default_flow_style = False
    with (mcap.parent / 'metadata.yaml').open('w') as fh:
        yaml.dump({'rosbag2_bagfile_information': info}, fh)
