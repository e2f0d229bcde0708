"""Imported last by the fork server (tests/fork_server.py): moves everything the preload created into the
permanent generation (``gc.freeze``), so a full ``gc.collect()`` in a child scans only what the child made.

DeepSpeed calls ``gc.collect()`` when it lays out ZeRO-3's partitions, once per engine; in a child of the
server that walked every object of torch, lightning, transformers and DeepSpeed each time (py-spy over the
whole suite: ~19 s of the children's wall time). The frozen objects are the modules' own, alive for the
whole process anyway.
"""

import gc

gc.freeze()
