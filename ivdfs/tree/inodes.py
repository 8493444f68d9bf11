"""The inode table: numbers never reused, parents, and the kernel's lookup counts.

Role: what `forget` needs (s3ql's `open_inodes`, borg's `DataReader.forget`). A node removed
from its directory by a refresh is *detached*: the kernel may still know it (an open file, a
cached dentry), so it stays until its lookup count falls to zero, then it and whatever it
holds (a disk's reader, its VDDK slot) are freed. Nodes still in the tree are never freed, so
memory follows the inventory, not the churn of a long mount.

Concurrency: trio thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ivdfs.errors import NotFound
from ivdfs.tree.nodes import DirNode, Node

ROOT_INO = 1


class InodeTable:
    def __init__(
        self,
        root: DirNode,
        on_free: Callable[[Node], None] = lambda _node: None,
        on_detach: Callable[[int, str], None] = lambda _parent, _name: None,
    ) -> None:
        """`on_free` releases what a freed node held; `on_detach(parent ino, name)` tells the
        kernel to drop a removed entry (so it forgets the inode soon)."""
        self.root = root
        self.nodes: dict[int, Node] = {root.ino: root}
        self._parent: dict[int, DirNode] = {}
        self._lookups: dict[int, int] = {}
        self._detached: set[int] = set()
        self._next_ino = root.ino + 1
        self._on_free = on_free
        self._on_detach = on_detach
        self.freed = 0

    def new_ino(self) -> int:
        ino, self._next_ino = self._next_ino, self._next_ino + 1
        return ino

    def get(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino}") from None

    def parent_of(self, node: Node) -> DirNode:
        return self._parent.get(node.ino, self.root)

    def add(self, parent: DirNode, node: Node) -> None:
        parent.children[node.name] = node
        self.nodes[node.ino] = node
        self._parent[node.ino] = parent

    def remove(self, parent: DirNode, name: str) -> None:
        """Take `name` out of `parent`; free it now unless the kernel still knows it."""
        node = parent.children.pop(name)
        if self._lookups.get(node.ino):
            self._detached.add(node.ino)
            self._on_detach(parent.ino, name)
        else:
            self._free(node)

    def remember(self, ino: int) -> None:
        """The kernel learned `ino` (a lookup or readdirplus reply)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino in self._detached:
            self._detached.discard(ino)
            node = self.nodes.get(ino)
            if node is not None:
                self._free(node)

    def _free(self, node: Node) -> None:
        if isinstance(node, DirNode):
            for child in list(node.children.values()):
                if self._lookups.get(child.ino):
                    self._detached.add(child.ino)  # freed once the kernel forgets it
                else:
                    self._free(child)
            node.children.clear()
        self.nodes.pop(node.ino, None)
        self._parent.pop(node.ino, None)
        self.freed += 1
        self._on_free(node)

    def path_of(self, node: Node) -> Path:
        """The node's path relative to the mount root."""
        names: list[str] = []
        while node.ino != self.root.ino:
            names.append(node.name)
            node = self._parent[node.ino]
        return Path(*reversed(names)) if names else Path()

    @property
    def known_to_kernel(self) -> int:
        return len(self._lookups)
