"""Helpers shared by the configs: parsing the `:arg` of `--config=configs/x.py:arg`."""

from __future__ import annotations

from typing import Sequence


def parse_tokens(arg: str | None, *, groups: dict[str, Sequence[str]],
                 defaults: dict[str, str]) -> dict[str, str]:
  """Parses a comma-separated list of variant tokens, at most one per group.

  `configs/pretrain.py:tiny,mp_mae_jepa` with groups {'size': (atto, tiny, ...),
  'objective': (s2_mae, ..., full)} gives {'size': 'tiny', 'objective': 'mp_mae_jepa'}.
  An unknown token, or two tokens of one group, is an error that lists the choices.
  """
  chosen = dict(defaults)
  seen: set[str] = set()
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    group = next((g for g, choices in groups.items() if token in choices), None)
    if group is None:
      choices = "; ".join(f"{g}: {', '.join(c)}" for g, c in groups.items())
      raise ValueError(f"unknown config variant {token!r}. Choices: {choices}")
    if group in seen:
      raise ValueError(f"config arg {arg!r} names two {group} variants")
    seen.add(group)
    chosen[group] = token
  return chosen
