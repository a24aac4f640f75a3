"""Every stage of the recipe, registered: `run(config, workdir)` runs `config.method`.

Importing this module imports each stage's module, which registers it with the harness
(`o3lite.training.stage.STAGES`); the entry points dispatch through it.
"""

from o3lite.rl import run as _rl  # noqa: F401  (registers "rl")
from o3lite.search import sweep as _sweep  # noqa: F401  (registers "test_time")
from o3lite.training import sft as _sft  # noqa: F401  (registers "sft")
from o3lite.training import stage as _stage
from o3lite.verifiers import filtering as _filtering  # noqa: F401  ("filtered_sft")
from o3lite.verifiers import run as _verifier  # noqa: F401  (registers "verifier")

STAGES = _stage.STAGES
run = _stage.run
