"""TextTable: the texts a store keeps (round trips, non-ASCII and empty texts, bad tensors refused), and the
texts of an EmbeddingStore through save / load, memory-mapped included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyquant.artifact import ArtifactError
from polyquant.artifact import load as load_artifact
from polyquant.artifact import save as save_artifact
from polyquant.plugins.embeddings.configs import Int8Config
from polyquant.plugins.embeddings.data import example_vectors
from polyquant.plugins.embeddings.store import EmbeddingStore
from polyquant.plugins.embeddings.texts import TextTable

TEXTS = ["plain ascii", "", "naïve café — 東京 🚀", "line one\nline two", "\x1b[31mred\x1b[0m"]
IDS = torch.tensor([40, 3, 17, 8, 25])


def test_round_trip_keeps_every_text_by_id() -> None:
    table = TextTable.from_texts(IDS, TEXTS)
    assert len(table) == 5 and table.ids.tolist() == [3, 8, 17, 25, 40]  # sorted: get is a binary search
    assert table.get(IDS) == TEXTS
    assert table.get(torch.tensor([[17, 3], [99, 40]])) == [TEXTS[2], "", None, "plain ascii"]  # read flat
    assert table.data.dtype == torch.uint8 and len(table.data) == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert table.offsets.tolist()[0] == 0 and table.offsets.tolist()[-1] == len(table.data)
    again = TextTable.from_tensors(table.tensors())
    assert again.get(IDS) == TEXTS
    assert TextTable.from_texts(torch.tensor([5, 6], dtype=torch.int32), ["", ""]).get(torch.tensor([6, 5])) == ["", ""]
    empty = TextTable.from_texts(torch.empty(0, dtype=torch.int64), [])
    assert len(empty) == 0 and len(empty.data) == 0 and empty.get(torch.tensor([1, 2])) == [None, None]


def test_bad_inputs_and_tensors_are_refused_naming_the_tensor() -> None:
    with pytest.raises(ValueError, match="id 3 is given more than once"):
        TextTable.from_texts(torch.tensor([3, 1, 3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"integer ids \(n,\) = \(2,\)"):
        TextTable.from_texts(torch.tensor([1, 2, 3]), ["a", "b"])
    with pytest.raises(ValueError, match="text 1 is not valid Unicode"):
        TextTable.from_texts(torch.tensor([1, 2]), ["a", "\ud800"])
    with pytest.raises(ValueError, match="text 0 is a bytes, not a str"):
        TextTable.from_texts(torch.tensor([1]), [b"a"])  # type: ignore[list-item]
    good = TextTable.from_texts(IDS, TEXTS).tensors()
    cases = [
        ({"data": good["data"].to(torch.int8)}, "tensor 'texts.data' must be torch.uint8"),
        ({"offsets": good["offsets"].int()}, "tensor 'texts.offsets' must be torch.int64"),
        ({"ids": good["ids"][None]}, r"tensor 'texts.ids' must be torch.int64 \(n,\), got torch.int64 \(1, 5\)"),
        ({"offsets": good["offsets"][:-1]}, "must hold 6 offsets for 5 ids, got 5"),
        ({"offsets": good["offsets"].flip(0)}, "tensor 'texts.offsets' must rise from 0"),
        ({"offsets": torch.tensor([0, 11, 5, 30, 40, len(good["data"])])}, "without decreasing"),
        ({"offsets": torch.cat([good["offsets"][:-1], good["offsets"][-1:] + 1])}, "texts.offsets' must rise"),
        ({"ids": torch.tensor([3, 8, 8, 25, 40])}, "tensor 'texts.ids' must be strictly increasing"),
        ({"ids": torch.tensor([40, 3, 17, 8, 25])}, "tensor 'texts.ids' must be strictly increasing"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            TextTable.from_tensors({**good, **change})
    with pytest.raises(ValueError, match=r"\['texts.offsets'\] do not match a text table"):
        TextTable.from_tensors({"data": good["data"], "ids": good["ids"]})
    bad = dict(good)
    bad["data"] = good["data"].clone()
    start = int(good["offsets"][2])  # the first byte of id 17's text ("naïve ..."): 0xff is never UTF-8
    bad["data"][start] = 0xFF
    table = TextTable.from_tensors(bad)  # accepted: a text is checked when it is decoded
    assert table.get(torch.tensor([3, 40])) == ["", "plain ascii"]
    with pytest.raises(ValueError, match="tensor 'texts.data': the text of id 17 is not valid UTF-8"):
        table.get(torch.tensor([17]))


def _store(n: int = 60) -> EmbeddingStore:
    x = example_vectors(n, 16, seed=7)
    store = EmbeddingStore.fit(x, config=Int8Config())
    store.add(x, ids=torch.arange(100, 100 + n))
    return store


@pytest.mark.parametrize("mmap", [False, True])
def test_store_texts_survive_save_and_load(tmp_path: Path, mmap: bool) -> None:
    store = _store()
    texts = [f"text {i}: {TEXTS[i % len(TEXTS)]}" for i in range(60)]
    texts[7] = ""
    store.set_texts(store.ids(), texts)
    assert store.texts_of(torch.tensor([107, 100, 159])) == ["", texts[0], texts[59]]
    path = store.save(tmp_path / "s.pqs")
    assert {"texts.data", "texts.offsets", "texts.ids"} <= set(load_artifact(path).tensors)
    loaded = EmbeddingStore.load(path, mmap=mmap)
    assert loaded.texts is not None and len(loaded.texts) == 60
    assert loaded.texts_of(loaded.ids()) == texts
    _, ids = loaded.search(example_vectors(60, 16, seed=7)[[3, 42]], 2)
    assert loaded.texts_of(ids)[0::2] == [texts[3], texts[42]]  # each stored vector finds itself first

    plain = _store()  # a store without texts saves none and shows none
    assert plain.texts is None and plain.texts_of(torch.tensor([100, 101])) == [None, None]
    reloaded = EmbeddingStore.load(plain.save(tmp_path / "plain.pqs"), mmap=mmap)
    assert reloaded.texts is None and not any(k.startswith("texts.") for k in reloaded.tensors())


def test_set_texts_checks_the_ids(tmp_path: Path) -> None:
    store = _store(10)
    with pytest.raises(ValueError, match=r"set_texts: 1 ids are not in the store \(first: 5\)"):
        store.set_texts(torch.tensor([100, 5]), ["a", "b"])
    with pytest.raises(ValueError, match="set_texts: 2 ids but 1 texts"):
        store.set_texts(torch.tensor([100, 101]), ["a"])
    with pytest.raises(ValueError, match="set_texts: ids contain duplicates"):
        store.set_texts(torch.tensor([100, 100]), ["a", "b"])
    store.delete(torch.tensor([103]))
    with pytest.raises(ValueError, match=r"set_texts: 1 ids are not in the store \(first: 103\)"):
        store.set_texts(torch.tensor([103]), ["deleted"])
    assert store.texts is None  # nothing was set by a refused call
    store.set_texts(torch.tensor([101, 100]), ["one", "zero"])  # a subset: the others have no text
    assert store.texts_of(torch.tensor([100, 101, 102])) == ["zero", "one", None]
    store.set_texts(torch.tensor([102]), ["two"])  # replaces the table
    assert store.texts_of(torch.tensor([100, 102])) == [None, "two"]
    store.close()
    assert store.texts is None


def test_damaged_text_tensors_in_an_artifact(tmp_path: Path) -> None:
    store = _store(20)
    store.set_texts(store.ids(), [f"doc {i} ✓" for i in range(20)])
    path = store.save(tmp_path / "s.pqs")
    art = load_artifact(path)
    del art.tensors["texts.ids"]
    save_artifact(art, tmp_path / "partial.pqs")
    with pytest.raises(ArtifactError, match=r"tensors \['texts.ids'\] do not match a int8 store"):
        EmbeddingStore.load(tmp_path / "partial.pqs")
    art = load_artifact(path)
    art.tensors["texts.offsets"][5] = 10_000  # past the end of texts.data
    save_artifact(art, tmp_path / "offsets.pqs")
    with pytest.raises(ArtifactError, match="offsets.pqs: not a valid int8 embedding store: tensor 'texts.offsets'"):
        EmbeddingStore.load(tmp_path / "offsets.pqs", mmap=True)
    art = load_artifact(path)
    art.tensors["texts.data"][int(art.tensors["texts.offsets"][4])] = 0xC0  # id 4: a lead byte with no follower
    save_artifact(art, tmp_path / "utf8.pqs")
    loaded = EmbeddingStore.load(tmp_path / "utf8.pqs", mmap=True)  # the bytes are read when a text is shown
    assert loaded.texts_of(torch.tensor([103, 105])) == ["doc 3 ✓", "doc 5 ✓"]
    with pytest.raises(ValueError, match="tensor 'texts.data': the text of id 104 is not valid UTF-8"):
        loaded.texts_of(torch.tensor([104]))
