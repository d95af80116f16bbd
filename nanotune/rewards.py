"""Reward functions for GRPO: how a completion is scored, and how a config names the scorers.

A reward function is any Python callable

    reward(prompts: list, completions: list[str], **record_fields) -> list[float]

giving one score per completion. `prompts[i]` is the prompt that completion i answers (its
record's `prompt` string or `messages` list); `record_fields` are the other fields of the records,
each a list aligned with the completions (`answer=[...]`, one entry per completion, so the
group_size completions of one prompt see its answer group_size times). A function names the
fields it needs and takes the rest with `**kwargs`.

`grpo.rewards` names them, `grpo.reward_weights` weighs them (the reward of a completion is the
weighted sum):

    rewards = ["exact_number", "format"]                   # built-ins, below
    rewards = ["my_package.rewards:length_penalty"]         # a module on the Python path
    rewards = ["examples/arith_grpo/rewards.py:score"]      # a file

Built-ins:
    exact_number   1 if the last number in the completion equals the record's `answer`, else 0
    format         1 if the whole completion matches `grpo.format_pattern`, else 0
    char_overlap   the character-level F1 of the completion against the record's `answer`
                   (extraction: an answer that is a span of the passage; no word splitting, so
                   Chinese text scores the same way as English)

A spec that names no function (a typo, a missing file, a missing attribute) is one line before
the model loads (`load_rewards`), and so is a built-in whose field the data lacks
(`check_reward_fields`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, GRPOConfig
from .data.records import DataError

# <think> reasoning </think> then <answer> ... </answer>: the layout R1-style recipes reward.
DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


# ----------------------------------------------------------------------------------------------
# Built-ins
# ----------------------------------------------------------------------------------------------


def last_number(text: str) -> float | None:
    """The last number written in `text` ("... so 12,345.5 apples" -> 12345.5), or None."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def exact_number(prompts, completions, answer, **fields) -> list[float]:
    """1.0 where the completion's last number equals the answer (as numbers: "42.0" is 42), else 0.0."""
    scores = []
    for completion, expected in zip(completions, answer):
        found, target = last_number(completion), last_number(str(expected))
        scores.append(float(found is not None and target is not None and math.isclose(found, target, abs_tol=1e-9)))
    return scores


def format_reward(pattern: str) -> Callable:
    """The `format` built-in for one regular expression: 1.0 where the stripped completion matches
    it whole (re.fullmatch, "." matching newlines too), else 0.0."""
    compiled = re.compile(pattern, flags=re.DOTALL)

    def matches_format(prompts, completions, **fields) -> list[float]:
        return [float(compiled.fullmatch(completion.strip()) is not None) for completion in completions]

    return matches_format


def char_overlap(prompts, completions, answer, **fields) -> list[float]:
    """Character F1 of each completion against its answer, whitespace ignored: 2PR / (P + R) over
    the multiset of characters. 1.0 for the exact span, partial credit for an overlapping one."""
    scores = []
    for completion, expected in zip(completions, answer):
        predicted, gold = Counter("".join(completion.split())), Counter("".join(str(expected).split()))
        common = sum((predicted & gold).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / sum(predicted.values()), common / sum(gold.values())
        scores.append(2 * precision * recall / (precision + recall))
    return scores


BUILTINS = ("exact_number", "format", "char_overlap")
FIELDS_NEEDED = {"exact_number": ("answer",), "char_overlap": ("answer",), "format": ()}


# ----------------------------------------------------------------------------------------------
# From the config to callables
# ----------------------------------------------------------------------------------------------


@dataclass
class Reward:
    """One reward function of a run: the name it is logged under, the callable, its weight."""

    name: str
    function: Callable
    weight: float
    spec: str  # as the config wrote it
    fields_needed: tuple[str, ...] = ()  # record fields a built-in reads (checked against the data)


def load_rewards(grpo: GRPOConfig) -> list[Reward]:
    """`grpo.rewards` and `grpo.reward_weights` -> Rewards; a spec naming nothing is one ConfigError."""
    weights = grpo.reward_weights or [1.0] * len(grpo.rewards)
    rewards, names = [], set()
    for spec, weight in zip(grpo.rewards, weights):
        if spec in BUILTINS:
            function = format_reward(grpo.format_pattern or DEFAULT_FORMAT) if spec == "format" else globals()[spec]
            name, needed = spec, FIELDS_NEEDED[spec]
        else:
            function, name, needed = _user_function(spec), spec.rpartition(":")[2], ()
        while name in names:  # the same function twice (with two weights): logged apart
            name += "_"
        names.add(name)
        rewards.append(Reward(name, function, float(weight), spec, needed))
    return rewards


def _user_function(spec: str) -> Callable:
    """"module:function" or "path/to/file.py:function" -> the callable."""
    where = f"grpo.rewards: {spec!r}"
    source, colon, function_name = spec.rpartition(":")
    if not colon or not source or not function_name:
        raise ConfigError(f"{where} is not a built-in ({', '.join(BUILTINS)}) nor module:function or "
                          f"path/to/file.py:function")
    try:
        if source.endswith(".py") or "/" in source:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"{where}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"nanotune_user_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ModuleNotFoundError as error:
        raise ConfigError(f"{where}: no module {error.name!r} (is it on the Python path?)") from None
    except (SyntaxError, ImportError) as error:
        raise ConfigError(f"{where}: {source} cannot be imported ({type(error).__name__}: {error})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(f"{where}: {source} has no {function_name!r}")
    if not callable(function):
        raise ConfigError(f"{where}: {source}.{function_name} is not callable")
    return function


def check_reward_fields(rewards: list[Reward], records) -> None:
    """Every prompt record (data/prompts.py) has the fields the built-in rewards read; the first
    that lacks one is named."""
    for reward in rewards:
        for name in reward.fields_needed:
            for record in records:
                if record.fields.get(name) is None:
                    raise DataError(f"{record.line}: no field {name!r}, which the {reward.name} reward reads")


def score(rewards: list[Reward], prompts: list, completions: list[str], fields: dict[str, list]) -> list[list[float]]:
    """Each reward function's scores: one list per function, one float per completion.

    A function that returns the wrong number of scores, or something that is not a finite number,
    stops the run with one line naming it (a bug in a reward function would otherwise train the
    model on garbage).
    """
    scores = []
    for reward in rewards:
        values = reward.function(prompts, completions, **fields)
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ConfigError(f"reward {reward.spec!r} returned {len(values)} scores for {len(completions)} completions")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"reward {reward.spec!r} returned a score that is not a number: {values[:4]}") from None
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"reward {reward.spec!r} returned a score that is not finite: {values[:4]}")
        scores.append(values)
    return scores
