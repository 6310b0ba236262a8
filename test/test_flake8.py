"""ament_flake8 over the package's Python, as `colcon test` runs it in a ROS workspace."""

from pathlib import Path

from ament_flake8.main import main_with_errors
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Named paths, not the repository root: .venv, build/ and install/ hold other projects' code.
PATHS = [str(ROOT / p) for p in ('timebill_ros', 'test', 'launch', 'benchmarks', 'tools',
                                 'setup.py')]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    rc, errors = main_with_errors(argv=PATHS)
    assert rc == 0, f'{len(errors)} ament_flake8 findings:\n' + '\n'.join(errors)
