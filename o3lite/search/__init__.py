"""Test-time search strategies (`core.STRATEGIES`, run with `core.run_strategy`).

Importing the package imports every strategy module, so the registry is full whichever
module a caller imports first.
"""

from o3lite.search import best_of_n, budget, mcts, revise, tree, voting  # noqa: F401  (registering)
