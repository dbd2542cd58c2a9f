"""Reading edgekit's YAML files (configs, target profiles): plain values only (yaml.SafeLoader), a key given twice
in one mapping refused, and what is wrong said in words."""

from __future__ import annotations

import re
import typing

import yaml


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping, with the lines of both."""

    def __init__(self, key: object, lines: tuple[int, int]) -> None:
        super().__init__(f"{key!r} at lines {lines[0]} and {lines[1]}")
        self.key, self.lines = key, lines


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    one silently (a second `train:` section replaced the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given beside it override it, as meant
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in first:  # an unhashable key: PyYAML's own error
                raise DuplicateKey(key, (first[key], line))
            first[key] = line
        return super().construct_mapping(node, deep)


def load(text: str) -> object:
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: a !!python tag is refused, never run


def problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file PyYAML refused, and what to do."""
    if isinstance(exc, DuplicateKey):
        first, second = exc.lines
        lines = f"lines {first} and {second}" if first != second else f"line {first}"
        return f"gives {exc.key!r} twice in one mapping ({lines}); YAML would keep the last silently: give it once"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    tag = re.search(r"constructor for the tag '([^']+)'", str(getattr(exc, "problem", "")))
    if not tag:
        return f"is not valid YAML{where}; fix the syntax"
    name = tag[1].replace("tag:yaml.org,2002:", "!!")  # a tag the safe loader refuses: not a syntax error
    what, why = (("a Python object tag", "never loads (it would run code)") if name.startswith("!!python/")
                 else ("a YAML tag", "does not load"))
    return f"holds {what} ({name}){where}, which edgekit {why}; write plain values (numbers, text, lists, mappings)"
