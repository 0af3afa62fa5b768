"""Reading YAML a user (or an attacker) wrote: recipes, policies, `--set` values, `--as`, `--formats`.

`parse_yaml(text, where)` is `yaml.safe_load` (no tags that build Python objects) made strict:

* a duplicate key in a mapping is an error (PyYAML keeps the last one silently; `lr: 1e-3` written
  twice with two values must not pick one): merge keys (`<<: *base`) still override as YAML says;
* a document whose aliases expand to more than `MAX_NODES` nodes is refused before it is built
  (the "billion laughs": 500 bytes whose anchors nest ten copies ten deep describe 10^10 values;
  PyYAML shares them, but anything that walks the result, an error message included, does not);
  so is a recursive alias (`&a [*a]`) and nesting deeper than Python's recursion allows;
* every error is one line that names where the text came from and the line and column.

`read_text_file(path, what)` reads a file that must be UTF-8 text and says which file is not:
missing, a directory, empty, binary (NUL bytes), not UTF-8 (and at which byte), or too large.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from qtoolkit.errors import ConfigError, QToolkitError, short_repr

MAX_NODES = 100_000  # a recipe has ~50; a searched policy for a 1000-layer model ~10^4
MAX_TEXT_BYTES = 16 * 2**20  # recipes and policies are kilobytes


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                if duplicate:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found duplicate key {short_repr(key, 60)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(root: Node, limit: int) -> int:
    """Nodes of the document with every alias expanded; raises ValueError past `limit` or on a
    cycle. Shared nodes are counted once per use but computed once (memo), so this is linear in the
    document's size however large its expansion."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in active:
            raise ValueError("a recursive alias (an anchor used inside itself)")
        active.add(key)
        if isinstance(node, ScalarNode):
            n = 1
        elif isinstance(node, SequenceNode):
            n = 1 + sum(size(c) for c in node.value)
        elif isinstance(node, MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        active.discard(key)
        if n > limit:
            raise ValueError(f"its aliases expand to more than {limit:,} values (an alias bomb?)")
        memo[key] = n
        return n

    return size(root)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(mark) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def parse_yaml(text: str, where: str, error: type[QToolkitError] = ConfigError) -> Any:
    """Strict `yaml.safe_load` of `text` (module docstring); problems raise `error` in one line."""
    loader = None
    try:
        loader = StrictLoader(text)  # the reader already refuses some characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, MAX_NODES)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        problem = " ".join(str(e.problem or e.context or "invalid").split())
        raise error(f"{where}: not valid YAML: {_clip(problem)}{_where(e.problem_mark)}") from None
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {_clip(' '.join(str(e).split()))}") from None
    except ValueError as e:
        raise error(f"{where}: refused: {e}") from None
    except RecursionError:
        raise error(f"{where}: refused: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text_file(path: str | Path, what: str, error: type[QToolkitError] = ConfigError,
                   max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of `path`, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path}: no such file")
    if path.is_dir():
        raise error(f"{what} {path}: is a directory, not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what} {path}: {size:,} bytes, more than the {max_bytes:,} a {what} may have")
    data = path.read_bytes()
    if not data.strip():
        raise error(f"{what} {path}: empty file")
    if b"\0" in data:
        raise error(f"{what} {path}: a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_yaml_file(path: str | Path, what: str, error: type[QToolkitError] = ConfigError) -> Any:
    path = Path(path)
    return parse_yaml(read_text_file(path, what, error), f"{what} {path}", error)


__all__ = ["MAX_NODES", "StrictLoader", "parse_yaml", "read_text_file", "read_yaml_file"]
