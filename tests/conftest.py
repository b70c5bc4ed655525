"""Test setup: import detfocal from this checkout, keep torch to the cores we have."""
import os
import sys
from pathlib import Path

# libgomp threads spin while waiting; with subprocess tests (DDP, tools) sharing 2 cores the
# spinning starves the real work. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_COCO = ROOT.parent / "shared" / "data" / "coco_val2014_100"
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
