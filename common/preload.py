"""Imports done once, before any work, by whichever Flower app a process loads first.

Flower's simulation runs the ServerApp in one thread and loads the ClientApp in another, in one
process. torch.distributed's modules import each other in a cycle, and when two threads import
them at once one of them gets "cannot import name ... from partially initialized module": the
ServerApp pulls them in through torch._dynamo on its first optimizer step, the ClientApp through
opacus. Both apps (server/app.py, client/app.py) import this module first, so the second thread waits on its import
lock until everything here is whole.
"""

import opacus  # noqa: F401
import torch._dynamo  # noqa: F401
