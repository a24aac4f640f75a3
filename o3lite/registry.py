"""Registries: the small pure functions each stage chooses by name from its config.

  ADVANTAGES = Registry("advantage estimator")

  @ADVANTAGES.register("grpo")
  def grpo(...): ...

  ADVANTAGES.lookup(config.rl.advantage)   # a ConfigError naming the registered ones

A Registry is a dict (name -> function), so `sorted(ADVANTAGES)` lists the names and
`ADVANTAGES[name]` reads one that is known to be there.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from o3lite import errors

Fn = TypeVar("Fn", bound=Callable)


class Registry(dict):
  """Functions by name; `what` names them in error messages ("loss", "reward function")."""

  def __init__(self, what: str):
    super().__init__()
    self.what = what

  def register(self, name: str) -> Callable[[Fn], Fn]:
    """Decorator registering a function under `name` (twice is a bug: ValueError)."""
    def wrap(fn: Fn) -> Fn:
      if name in self:
        raise ValueError(f"{self.what} {name!r} is registered twice")
      self[name] = fn
      return fn
    return wrap

  def lookup(self, name: str) -> Callable:
    """The function registered as `name`; a ConfigError (bad input) when there is none."""
    if name not in self:
      raise errors.ConfigError(f"unknown {self.what} {name!r}; registered: {sorted(self)}")
    return self[name]
