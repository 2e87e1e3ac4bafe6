"""The helper modules beside these tests (``traindata``, ``rawsamples``, ``badcorpus``) import by
name: with ``--import-mode=importlib`` pytest puts no test folder on ``sys.path`` itself."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
