"""``TextTable``: the texts of a store's vectors, kept in the artifact as three plain tensors (never pickle).

    table = TextTable.from_texts(ids, ["a text", "another"])    # ids: int64 (n,), unique
    table.get(torch.tensor([7, 3]))                              # ["another", None]: None for an id without text
    table.tensors()                                              # {"data", "offsets", "ids"}: an artifact's tensors

| tensor  | dtype | shape  | holds                                                                     |
|---------|-------|--------|---------------------------------------------------------------------------|
| data    | uint8 | (B,)   | the UTF-8 bytes of every text, back to back                                 |
| offsets | int64 | (n+1,) | text i is data[offsets[i] : offsets[i + 1]]; 0 first, B last, non-decreasing |
| ids     | int64 | (n,)   | the store id of text i, strictly increasing (``get`` is a binary search)   |

``get`` decodes only the texts it is asked for, so a memory-mapped table (``EmbeddingStore.load(path, mmap=True)``)
reads the pages of those texts only. The offsets and ids are checked whole when a table is built (16 bytes per
text); the bytes of a text are checked to be UTF-8 when it is decoded. Problems are ``ValueError`` naming the
tensor as the store's artifact does (``texts.offsets``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["TextTable"]


@dataclass(frozen=True)
class TextTable:
    """UTF-8 texts by store id (module docstring).

    Args:
        data: uint8 (B,): the UTF-8 bytes of every text, back to back.
        offsets: int64 (n + 1,): text i is ``data[offsets[i] : offsets[i + 1]]``; offsets[0] == 0, offsets[n] == B,
            non-decreasing.
        ids: int64 (n,): the store id of text i, strictly increasing.
    """

    TENSORS: ClassVar[tuple[str, ...]] = ("data", "offsets", "ids")  # in a store's artifact: texts.<name>

    data: Tensor
    offsets: Tensor
    ids: Tensor

    def __post_init__(self) -> None:
        for name, dtype in (("data", torch.uint8), ("offsets", torch.int64), ("ids", torch.int64)):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != dtype or t.dim() != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"tensor 'texts.{name}' must be {dtype} (n,), got {got}")
        n = len(self.ids)
        if len(self.offsets) != n + 1:
            raise ValueError(f"tensor 'texts.offsets' must hold {n + 1} offsets for {n} ids, got {len(self.offsets)}")
        first, last = int(self.offsets[0]), int(self.offsets[-1])
        if first != 0 or last != len(self.data) or not bool((self.offsets[1:] >= self.offsets[:-1]).all()):
            raise ValueError(f"tensor 'texts.offsets' must rise from 0 to the {len(self.data)} bytes of "
                             f"'texts.data' without decreasing, got {first} .. {last}")
        if not bool((self.ids[1:] > self.ids[:-1]).all()):
            raise ValueError("tensor 'texts.ids' must be strictly increasing (one text per id)")

    @classmethod
    def from_texts(cls, ids: Tensor, texts: Sequence[str]) -> TextTable:
        """The table of ``texts[i]`` for store id ``ids[i]``: ids int64 (n,), unique (any order); ``ValueError``
        for a length mismatch, a repeated id or a text that is not a string of valid Unicode."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or len(ids) != len(texts):
            raise ValueError(f"texts need integer ids (n,) = ({len(texts)},), got {ids.dtype} {tuple(ids.shape)}")
        order = torch.argsort(ids, stable=True)
        encoded = []
        for i in order.tolist():
            text = texts[i]
            if not isinstance(text, str):
                raise ValueError(f"text {i} is a {type(text).__name__}, not a str")
            try:
                encoded.append(text.encode("utf-8"))
            except UnicodeEncodeError as e:  # a lone surrogate
                raise ValueError(f"text {i} is not valid Unicode ({e.reason})") from None
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
        joined = b"".join(encoded)
        data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        sorted_ids = ids[order].long()
        if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            repeated = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise ValueError(f"texts: id {repeated} is given more than once")
        return cls(data=data, offsets=offsets, ids=sorted_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, ids: Tensor) -> list[str | None]:
        """The text of each id (any integer shape, read flat), None for an id without text. Only the requested
        texts are read and decoded; ``ValueError`` naming ``texts.data`` if one is not valid UTF-8."""
        ids = torch.as_tensor(ids).reshape(-1).long()
        if not len(self.ids):
            return [None] * len(ids)
        pos = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        found = self.ids[pos] == ids
        out: list[str | None] = []
        for p, hit, id_ in zip(pos.tolist(), found.tolist(), ids.tolist()):
            if not hit:
                out.append(None)
                continue
            raw = self.data[int(self.offsets[p]) : int(self.offsets[p + 1])].numpy().tobytes()
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"tensor 'texts.data': the text of id {id_} is not valid UTF-8 ({e.reason})") from None
        return out

    def tensors(self) -> dict[str, Tensor]:
        """``data``, ``offsets``, ``ids``: what an artifact stores (as ``texts.<name>``)."""
        return {"data": self.data, "offsets": self.offsets, "ids": self.ids}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> TextTable:
        """Rebuild a table from ``tensors()`` output; ``ValueError`` naming the tensor if they do not fit."""
        if set(tensors) != set(cls.TENSORS):
            names = sorted(f"texts.{k}" for k in set(tensors) ^ set(cls.TENSORS))
            raise ValueError(f"tensors {names} do not match a text table (texts.data, texts.offsets, texts.ids)")
        return cls(data=tensors["data"], offsets=tensors["offsets"], ids=tensors["ids"])
