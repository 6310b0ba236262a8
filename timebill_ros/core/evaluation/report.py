"""
Benchmark reports: JSON for machines, Markdown for people, PNGs like the paper's figures.

This module writes them; the text is ``report_markdown``, the PNGs ``report_figures``.

Re-render a saved run (new CIs, tables and PNGs; results.json is left as measured)::

    python -m timebill_ros.core.evaluation.report results/eval/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import sys
from typing import Any, Dict, List, Optional

from .report_figures import figures
from .report_markdown import markdown
from .report_rows import add_cis


def _clean(x: Any) -> Any:
    """JSON without NaN/inf (not valid JSON): those become null."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(data: dict, path: Path) -> Path:
    """Write ``data`` as strict JSON (NaN and inf as null), so any JSON reader takes it."""
    path.write_text(json.dumps(_clean(data), indent=1))
    return path


def write_report(results: dict, out_dir: Path | str, plots: bool = True) -> Dict[str, Path]:
    """results.json, report.md and the PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    add_cis(results)
    paths: Dict[str, Path] = {}
    if plots:
        figs = figures(results, out_dir)
        results['figures'] = [str(p) for p in figs]
        paths.update({p.stem: p for p in figs})
    paths['json'] = write_json(results, out_dir / 'results.json')
    md = out_dir / 'report.md'
    md.write_text(markdown(results))
    paths['markdown'] = md
    return paths


def rerender(json_path: Path | str, plots: bool = True) -> Dict[str, Path]:
    """
    Write report.md and the PNGs again next to a saved results.json, without rerunning the sweep.

    CIs missing from old files are recomputed from the stored outcomes; the JSON itself is not
    rewritten, so the measured data stays as it was saved.
    """
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    out_dir = json_path.parent
    add_cis(results)
    paths: Dict[str, Path] = {}
    if plots:
        figs = figures(results, out_dir)
        results['figures'] = [str(p) for p in figs]
        paths.update({p.stem: p for p in figs})
    else:  # keep links only to figures still there from an earlier render
        results['figures'] = [
            f for f in results.get('figures', []) if (out_dir / Path(f).name).is_file()
        ]
    md = out_dir / 'report.md'
    md.write_text(markdown(results))
    paths['markdown'] = md
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m timebill_ros.core.evaluation.report',
        description='Re-render report.md and the PNGs from a saved results.json.',
    )
    p.add_argument('results_json', help='results.json written by `timebill eval`')
    p.add_argument('--no-plots', action='store_true', help='report.md only')
    args = p.parse_args(argv)
    if not Path(args.results_json).is_file():
        p.error(f'no such file: {args.results_json}')
    for name, path in rerender(args.results_json, plots=not args.no_plots).items():
        print(f'{name}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
