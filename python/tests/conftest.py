import os
import sys

import torch

# The helpers in this folder (reference.py) import as plain modules.
sys.path.insert(0, os.path.dirname(__file__))

# Two cores on CI: keep torch's side (references, the drop-ins' peers) to what we have.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_report_header(config):
    import maskattn

    # Which copy is under test: the installed package, not the source folder.
    return f"maskattn from {os.path.dirname(maskattn.__file__)}"
