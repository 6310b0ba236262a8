"""ament_pep257 over the package's Python, as `colcon test` runs it in a ROS workspace."""

from ament_pep257.main import main
import pytest
from test_flake8 import PATHS


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=PATHS)
    assert rc == 0, 'ament_pep257 findings: see the output above'
