"""``EmbeddingStore``: quantized (and optionally dimension-reduced) embedding vectors with top-k search on the codes.

    from polyquant.plugins.embeddings import EmbeddingStore, Int8Config

    store = EmbeddingStore.fit(calibration, config=Int8Config(reduce="pca", keep=0.5), workdir="/scratch")
    for chunk in chunks:                          # (n, D) float vectors; codes go to a memory-mapped file
        store.add(chunk)                          # ids 0, 1, 2, ... unless given (int64)
    scores, ids = store.search(queries, k=10, rescore=4)
    store.delete(torch.tensor([3, 7])); store.update(torch.tensor([5]), new_vector)
    store.save("docs.pqs"); store = EmbeddingStore.load("docs.pqs", mmap=True)

Vectors and queries are L2-normalised on the way in (similarity is the cosine); the reduction and the format are
fitted on calibration vectors (``reduce.Reducer``, ``formats.Codec``; how each keeps scores comparable to the
original cosine is documented there).

Storage: every per-vector array (codes, fp8 row scales, ids, live flags, optional original vectors) is a growable
row buffer, in RAM or, with ``workdir``, in a memory-mapped file there (grown in place), so a store larger than RAM
builds chunk by chunk. ``save`` writes a polyquant artifact (``polyquant.save``: codes, codec and reduction tensors
as first-class entries, ``ids`` int64 and ``live`` bool tensors, the config in the manifest); ``load(mmap=True)``
maps the file instead of reading it (``polyquant.artifact.load(mmap=True)``), so a store larger than RAM can be
searched. A memory-mapped store is copy-on-write: deleting or updating changes pages in memory, never the file,
until it is saved; adding to it copies the mapped rows into a growable buffer first. The texts of the vectors, if
set (``set_texts``: ``polyquant quantize --input texts.txt`` does), are saved as ``texts.*`` tensors
(``texts.TextTable``); a search reads only the texts of its hits (``texts_of``).

Damage: ``load`` verifies every tensor's sha256 by default, also memory-mapped (one pass over the file, about the
cost of one search: ``benchmarks/store_verify.py``; ``verify=False`` / ``polyquant search --no-verify`` skip it).
Whether verified or not, the codec and reduction tensors must be finite and bounded (``formats.check_values``) and
no live id may appear twice, at load; a live vector whose codes score NaN / Inf, an original vector that is not a
unit vector and decoded codes that are not finite are refused where a search reads them (an fp8 E4M3 NaN code,
which the scan reads as a finite value, where a search returns its vector or ``forward`` scores it). Each is a
``ValueError`` naming the tensor (``ArtifactError`` naming the file from ``load``), never a NaN score.

Search scans the codes chunk by chunk with a running top-k (``Codec.scores``: on the CPU float32 tiles of upcast
codes times the float query; on CUDA the int8 GEMM for integer codes; ``polyquant.kernels.hamming_topk`` for binary
codes), skipping deleted vectors (tombstones). With ``rescore`` r > 1 it keeps k * r candidates
and rescores them with the float query: against the original vectors when the store keeps them
(``keep_originals``), else against the dequantized codes.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .configs import EmbeddingConfig, method_name
from .formats import MAX_MAGNITUDE, Codec, PreparedQueries, fit_codec
from .reduce import Reducer, fit_reducer
from .texts import TextTable

__all__ = ["EmbeddingStore", "PLUGIN", "normalize_rows", "prepare_queries", "unit_rows"]

PLUGIN = "embeddings"
_MIN_CAPACITY = 1024  # rows of a new buffer
_ID_CHUNK = 1 << 20  # ids scanned per step (delete, update, duplicate checks)
_BIG = torch.iinfo(torch.int64).max
_SCORES_PER_STEP = 1 << 20  # scores (queries x vectors) a dense scan keeps per step, at least one chunk's
_HAMMING_SPAN = 1 << 21  # binary codes per CPU Hamming call (read in place: 96 MB at 384 bits)


def normalize_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` (N, D) float scaled to unit L2 norm, as float32; zero rows stay zero, NaN / Inf rows are not
    checked (``unit_rows`` refuses them). A row whose norm overflows (entries near 3e38: the squares are infinite)
    or underflows is divided by its largest entry first, so any finite row keeps its direction; float64 rows are
    normalised before the cast, so 1e300 rows do too. Other rows are x / ||x|| as computed directly."""
    x = x if x.dtype == torch.float64 else x.float()
    norms = x.norm(dim=1, keepdim=True)  # (N, 1)
    extreme = ~torch.isfinite(norms) | (norms < torch.finfo(x.dtype).tiny ** 0.5)
    if bool(extreme.any()):
        peak = x.abs().amax(dim=1, keepdim=True)
        scaled = x / torch.where(peak > 0, peak, 1)  # entries in [-1, 1], the largest +-1
        x = torch.where(extreme, scaled, x)
        norms = torch.where(extreme, scaled.norm(dim=1, keepdim=True), norms)
    return (x / torch.where(norms > 0, norms, 1)).float()


def unit_rows(x: Tensor, what: str, dim: int, *, first_row: int = 0) -> Tensor:
    """``x`` (N, dim) as float32 unit rows (``normalize_rows``); ``ValueError`` (one line) for a wrong shape,
    NaN / Inf or a zero row (rows are numbered from ``first_row`` in the message). Any finite non-zero row is
    accepted, 3e38 entries included."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 2 or x.shape[1] != dim or not (x.dtype.is_floating_point or x.shape[0] == 0):
        raise ValueError(f"{what} must be float vectors (N, {dim}), got {x.dtype} {tuple(x.shape)}")
    x = x if x.dtype == torch.float64 else x.float()
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        first = first_row + int(bad.nonzero()[0])
        raise ValueError(f"{what}: {int(bad.sum())} vectors contain NaN or Inf (first: row {first})")
    zero = ~x.bool().any(dim=1)
    if bool(zero.any()):
        raise ValueError(f"{what}: {int(zero.sum())} vectors are zero and have no direction (first: row "
                         f"{first_row + int(zero.nonzero()[0])})")
    return normalize_rows(x)


def prepare_queries(queries: Tensor | np.ndarray, reducer: Reducer, codec: Codec, *,
                    query_codes: bool | None = None) -> tuple[Tensor, PreparedQueries]:
    """Queries (Q, D) or (D,) as unit float32 rows, and prepared for scoring against ``codec``'s codes after
    ``reducer`` (``ValueError`` for no queries, a wrong shape, NaN / Inf or a zero query); ``query_codes``: see
    ``Codec.prepare``."""
    q = queries if isinstance(queries, Tensor) else torch.as_tensor(np.asarray(queries))
    if q.dim() == 1:
        q = q[None]
    if q.shape[0] == 0:
        raise ValueError("no queries given")
    q = unit_rows(q, "queries", reducer.in_dim)
    return q, codec.prepare(*reducer.queries(q), query_codes=query_codes)


class _Rows:
    """Rows of one dtype and shape in a growable byte buffer: RAM, a memory-mapped file we own (grown in place),
    or an outside array (a loaded artifact's tensor, copied on growth)."""

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], *, folder: Path | None,
                 data: Tensor | None = None) -> None:
        self.dtype, self.shape = dtype, shape
        self.row_bytes = math.prod(shape) * dtype.itemsize
        self.folder = folder
        self.path: Path | None = None  # our memory-mapped file
        self.data: np.ndarray  # (capacity, row_bytes) uint8
        if data is not None and len(data):
            self.count = len(data)
            self.data = data.reshape(len(data), -1).view(torch.uint8).numpy()
        else:
            self.count = 0
            self.data = self._allocate(_MIN_CAPACITY)

    def _allocate(self, capacity: int) -> np.ndarray:
        if self.folder is None:
            return np.zeros((capacity, self.row_bytes), dtype=np.uint8)
        fd, name = tempfile.mkstemp(dir=self.folder, suffix=".rows")
        os.close(fd)
        self.path = Path(name)
        return np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(capacity, self.row_bytes))

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows (grows by doubling)."""
        if capacity <= len(self.data):
            return
        capacity = max(capacity, 2 * len(self.data))
        if self.path is not None and isinstance(self.data, np.memmap):  # our file: grow it in place
            self.data.flush()
            with open(self.path, "r+b") as f:
                f.truncate(capacity * self.row_bytes)
            self.data = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(capacity, self.row_bytes))
            return
        old = self.data
        self.data = self._allocate(capacity)
        self.data[: self.count] = old[: self.count]

    def view(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) as a tensor (shares memory with the buffer)."""
        stop = self.count if stop is None else stop
        raw = torch.from_numpy(self.data[start:stop])  # (m, row_bytes) uint8
        return raw.view(self.dtype).reshape(stop - start, *self.shape)

    def gather(self, slots: Tensor) -> Tensor:
        """Rows at ``slots`` (a copy)."""
        raw = torch.from_numpy(self.data[slots.cpu().numpy()])
        return raw.view(self.dtype).reshape(len(slots), *self.shape)

    def _bytes(self, rows: Tensor) -> np.ndarray:
        rows = rows.detach().cpu().to(self.dtype).contiguous()
        return rows.reshape(len(rows), math.prod(self.shape)).view(torch.uint8).numpy()

    def append(self, rows: Tensor) -> None:
        self.reserve(self.count + len(rows))
        self.data[self.count : self.count + len(rows)] = self._bytes(rows)
        self.count += len(rows)

    def write(self, slots: Tensor, rows: Tensor) -> None:
        self.data[slots.cpu().numpy()] = self._bytes(rows)

    def flush(self) -> None:
        if isinstance(self.data, np.memmap) and self.data.mode != "r":
            self.data.flush()


class EmbeddingStore(nn.Module):
    """Quantized embedding vectors with ids, tombstones and top-k search on the codes (module docstring).

    Args:
        config: the method config (format, reduction, calibration size, originals, default rescoring).
        reducer: the fitted reduction (``reduce.fit_reducer``).
        codec: the fitted format on the reduced vectors (``formats.fit_codec``).
        embedder: name of the text model the vectors come from (recorded for text queries), or None.
        workdir: folder for the memory-mapped row buffers (a private sub-folder, removed with the store); None
            keeps them in RAM.
        chunk_size: vectors encoded / scanned per step (a search of few queries scans longer steps, up to 2^20
            scores at a time).
    """

    def __init__(self, *, config: EmbeddingConfig, reducer: Reducer, codec: Codec, embedder: str | None = None,
                 workdir: str | os.PathLike[str] | None = None, chunk_size: int = 32768) -> None:
        super().__init__()
        method_name(config)  # a TypeError for a foreign config
        if codec.dim != reducer.out_dim or codec.format != config.FORMAT:
            raise ValueError(f"codec {codec.format} of {codec.dim} dims does not match the config "
                             f"({config.FORMAT}) or the reduction ({reducer.out_dim} dims)")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.config, self.reducer, self.codec, self.embedder = config, reducer, codec, embedder
        self.chunk_size = chunk_size
        self._folder: Path | None = None
        if workdir is not None:
            self._folder = Path(tempfile.mkdtemp(prefix="pq-store-", dir=workdir))
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        self._rows: dict[str, _Rows] = {}
        self._init_rows({})
        self._next_id = 0
        self._dead = 0
        self.texts: TextTable | None = None  # the texts of the vectors (``set_texts``), saved with the store

    def _init_rows(self, data: dict[str, Tensor]) -> None:
        layout = self._layout()
        self._rows = {name: _Rows(dtype, shape, folder=self._folder, data=data.get(name))
                      for name, (dtype, shape) in layout.items()}

    def _layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out = {"codes": (self.codec.code_dtype, (self.codec.code_width,)), "ids": (torch.int64, ()),
               "live": (torch.bool, ())}
        if self.codec.row_scaled:
            out["row_scale"] = (torch.float32, ())
        if self.config.keep_originals:
            out["originals"] = (torch.float32, (self.dim,))
        return out

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, calibration: Tensor, *, config: EmbeddingConfig, embedder: str | None = None,
            workdir: str | os.PathLike[str] | None = None, chunk_size: int = 32768) -> EmbeddingStore:
        """An empty store whose reduction and format are fitted on ``calibration`` (N, D) vectors (first
        ``config.calib_size`` rows; they are L2-normalised first)."""
        dim = _dim_of(calibration)
        x = unit_rows(torch.as_tensor(calibration[: config.calib_size]), "calibration vectors", dim)
        if len(x) == 0:
            raise ValueError("the calibration set is empty")
        reducer = fit_reducer(x, config.reduce, config.reduced_dim(x.shape[1]), seed=config.seed)
        scale = getattr(config, "scale", "none")
        codec = fit_codec(reducer.documents(x), config.FORMAT, scale=scale, center=getattr(config, "center", False),
                          magnitude=getattr(config, "magnitude", "uniform"))
        return cls(config=config, reducer=reducer, codec=codec, embedder=embedder, workdir=workdir,
                   chunk_size=chunk_size)

    @property
    def dim(self) -> int:
        """Dimensions of the vectors and queries it takes."""
        return self.reducer.in_dim

    @property
    def method(self) -> str:
        return method_name(self.config)

    def __len__(self) -> int:
        """Live (not deleted) vectors."""
        return self._rows["ids"].count - self._dead

    @property
    def slots(self) -> int:
        """Rows written, deleted ones included (tombstones)."""
        return self._rows["ids"].count

    def ids(self) -> Tensor:
        """The live ids, in storage order (int64)."""
        if not self.slots:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([ids[live] for ids, live in self._id_chunks()])

    def _id_chunks(self) -> list[tuple[Tensor, Tensor]]:
        """(ids, live flags) of every ``_ID_CHUNK`` slots (views)."""
        ends = [(i, min(i + _ID_CHUNK, self.slots)) for i in range(0, self.slots, _ID_CHUNK)]
        return [(self._rows["ids"].view(i, j), self._rows["live"].view(i, j)) for i, j in ends]

    # --- writing ------------------------------------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Make room for ``n`` vectors in total (optional: buffers grow by doubling)."""
        for rows in self._rows.values():
            rows.reserve(n)

    def add(self, vectors: Tensor, ids: Tensor | None = None, *, progress: bool = False) -> Tensor:
        """Encode and append vectors (N, dim) chunk by chunk; returns their ids (int64 (N,)).

        ``ids``: int64 (N,), unique and not live in the store already; default: one more than the largest id
        ever given, counting up. A bad input (shape, NaN / Inf, zero vector, duplicate id) raises ``ValueError``
        and leaves the store as it was.
        """
        n = _check_vectors(vectors, self.dim, "vectors")
        ids = self._new_ids(ids, n)
        counts = {name: rows.count for name, rows in self._rows.items()}
        next_id = self._next_id
        try:
            from tqdm.auto import tqdm

            for start in tqdm(range(0, n, self.chunk_size), desc="encode", disable=not progress, leave=False):
                stop = min(start + self.chunk_size, n)
                x = unit_rows(torch.as_tensor(vectors[start:stop]), "vectors", self.dim, first_row=start)
                self._append(x, ids[start:stop])
        except BaseException:
            for name, rows in self._rows.items():  # rows past the old counts are ignored, and overwritten later
                rows.count = counts[name]
            self._next_id = next_id
            raise
        if n:
            self._next_id = max(self._next_id, int(ids.max()) + 1)
        return ids

    def _new_ids(self, ids: Tensor | None, n: int) -> Tensor:
        if ids is None:
            return torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
        if ids.shape != (n,) or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"ids must be integers (N,) = ({n},), got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.long()
        if len(torch.unique(ids)) != n:
            raise ValueError("ids contain duplicates")
        present = self._slots_of(ids) >= 0
        if bool(present.any()):
            raise ValueError(f"{int(present.sum())} ids are in the store already (first: {int(ids[present][0])})")
        return ids

    def _append(self, x: Tensor, ids: Tensor) -> None:
        codes, row_scale = self.codec.encode(self.reducer.documents(x))
        self._rows["codes"].append(codes)
        if row_scale is not None:
            self._rows["row_scale"].append(row_scale)
        if "originals" in self._rows:
            self._rows["originals"].append(x)
        self._rows["live"].append(torch.ones(len(x), dtype=torch.bool))
        self._rows["ids"].append(ids)  # last: the row count

    def _slots_of(self, ids: Tensor) -> Tensor:
        """The slot of each id among the live vectors, -1 where absent."""
        out = torch.full((len(ids),), -1, dtype=torch.int64)
        if not len(ids) or not self.slots:
            return out
        sorted_ids, order = torch.sort(ids)
        for start, (chunk, live) in zip(range(0, self.slots, _ID_CHUNK), self._id_chunks()):
            pos = torch.searchsorted(sorted_ids, chunk).clamp(max=len(ids) - 1)
            hit = (sorted_ids[pos] == chunk) & live
            idx = hit.nonzero().flatten()
            out[order[pos[idx]]] = start + idx
        return out

    def _existing(self, ids: Tensor, what: str) -> Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{what}: ids must be integers, got {ids.dtype}")
        ids = ids.long()
        if len(torch.unique(ids)) != len(ids):
            raise ValueError(f"{what}: ids contain duplicates")
        slots = self._slots_of(ids)
        missing = slots < 0
        if bool(missing.any()):
            raise ValueError(f"{what}: {int(missing.sum())} ids are not in the store (first: {int(ids[missing][0])})")
        return slots

    def delete(self, ids: Tensor) -> int:
        """Mark the vectors with these ids deleted (tombstones, excluded from search); returns how many.
        An id that is not live raises ``ValueError`` and nothing is deleted."""
        slots = self._existing(ids, "delete")
        self._rows["live"].write(slots, torch.zeros(len(slots), dtype=torch.bool))
        self._dead += len(slots)
        return len(slots)

    def update(self, ids: Tensor, vectors: Tensor) -> None:
        """Replace the vectors of these (live) ids in place; a bad input changes nothing (``ValueError``)."""
        slots = self._existing(ids, "update")
        if _check_vectors(vectors, self.dim, "vectors") != len(slots):
            raise ValueError(f"update: {len(slots)} ids but {len(vectors)} vectors")
        x = unit_rows(torch.as_tensor(vectors), "vectors", self.dim)
        codes, row_scale = self.codec.encode(self.reducer.documents(x))
        self._rows["codes"].write(slots, codes)
        if row_scale is not None:
            self._rows["row_scale"].write(slots, row_scale)
        if "originals" in self._rows:
            self._rows["originals"].write(slots, x)

    # --- texts --------------------------------------------------------------------------------------------------

    def set_texts(self, ids: Tensor, texts: Sequence[str]) -> None:
        """Keep ``texts[i]`` as the text of live id ``ids[i]`` (replacing any texts set before), so that searches
        can show it (``texts_of``) and ``save`` stores it (tensors ``texts.data`` / ``texts.offsets`` /
        ``texts.ids``). ``ValueError`` for an id that is not live, a repeated id or a length mismatch. The table is
        set as a whole: ``delete``, ``update`` and ``add`` leave it as it is."""
        ids = torch.as_tensor(ids).reshape(-1)
        if len(ids) != len(texts):
            raise ValueError(f"set_texts: {len(ids)} ids but {len(texts)} texts")
        self._existing(ids, "set_texts")
        self.texts = TextTable.from_texts(ids, texts)

    def texts_of(self, ids: Tensor) -> list[str | None]:
        """The text of each id (read flat), None for an id without text (``set_texts``)."""
        n = torch.as_tensor(ids).numel()
        return [None] * n if self.texts is None else self.texts.get(ids)

    # --- search -------------------------------------------------------------------------------------------------

    def _prepare(self, queries: Tensor) -> tuple[Tensor, PreparedQueries]:
        return prepare_queries(queries, self.reducer, self.codec)

    def _chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor | None, Tensor]:
        rs = self._rows.get("row_scale")
        return (self._rows["codes"].view(start, stop), None if rs is None else rs.view(start, stop),
                self._rows["live"].view(start, stop))

    def _checked(self, scores: Tensor, row_scale: Tensor | None, live: Tensor, start: int) -> Tensor:
        """``scores`` (Q, m) of slots ``start``.., or ``ValueError`` if a live vector has a row scale outside
        (0, ``MAX_MAGNITUDE``] or scores NaN / Inf: its codes are damaged (the codec and reducer are checked at
        load, so nothing else can cause it)."""
        # finite scores are bounded (formats: every factor within 1e6), so their sum is finite unless one is not:
        # one reduction in the common case, the columns only when something is wrong (deleted vectors may be)
        scale_ok = row_scale is None or bool(((row_scale > 0) & (row_scale <= MAX_MAGNITUDE)).all())
        if scale_ok and math.isfinite(float(scores.sum())):
            return scores
        checks = [(~torch.isfinite(scores.sum(dim=0)), "tensor 'codes': scores NaN or Inf")]
        if row_scale is not None:
            checks.insert(0, (~((row_scale > 0) & (row_scale <= MAX_MAGNITUDE)), "tensor 'row_scale': not in (0, 1e6]"))
        for bad, why in checks:
            bad = bad.cpu() & live
            if bool(bad.any()):
                raise ValueError(f"the store is damaged: the vector in slot {start + int(bad.nonzero()[0])} ({why})")
        return scores

    def forward(self, queries: Tensor) -> Tensor:
        """Scores (Q, len(self)) of queries against every live vector in storage order, computed on the codes."""
        _, prep = self._prepare(queries)
        parts = []
        for start in range(0, self.slots, self.chunk_size):
            codes, row_scale, live = self._chunk(start, min(start + self.chunk_size, self.slots))
            self._refuse_damaged(self.codec.damaged(codes) & live, start)
            parts.append(self._checked(self.codec.scores(prep, codes, row_scale), row_scale, live, start)[:, live])
        return torch.cat(parts, dim=1) if parts else torch.empty(len(prep.bias), 0)

    def search(self, queries: Tensor, k: int = 10, *, rescore: int | None = None) -> tuple[Tensor, Tensor]:
        """The k best live vectors per query: (scores (Q, k) float32 descending, ids (Q, k) int64).

        ``queries``: (Q, dim) or (dim,). ``k`` is capped at ``len(self)``. ``rescore``: oversampling r (default
        ``config.rescore``): the k * r best by code score are rescored with the float query (see the module
        docstring); 1 returns the code scores.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        r = self.config.rescore if rescore is None else rescore
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"rescore must be a positive integer, got {r!r}")
        if len(self) == 0:
            raise ValueError("the store is empty: add vectors before searching")
        q, prep = self._prepare(queries)
        k = min(k, len(self))
        candidates = min(k * r, len(self))
        if self.codec.format == "binary":
            scores, slots = self._scan_hamming(prep, candidates)
        else:
            scores, slots = self._scan(prep, candidates)
        if r > 1:
            scores = self._rescore(q, prep, slots)
            scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
            slots = slots.gather(1, order)
        if self.codec.format == "fp8_e4m3":  # its NaN codes scan as finite values: refused where they are returned
            returned = torch.unique(slots[:, :k])
            self._refuse_damaged(self.codec.damaged(self._rows["codes"].gather(returned)), 0, returned)
        return scores[:, :k].contiguous(), self._rows["ids"].gather(slots[:, :k].reshape(-1)).reshape(-1, k)

    @staticmethod
    def _refuse_damaged(bad: Tensor, start: int, slots: Tensor | None = None) -> None:
        """``ValueError`` naming the first slot flagged by ``bad`` (slots ``start``.., or the given ``slots``)."""
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            slot = start + first if slots is None else int(slots[first])
            raise ValueError(f"the store is damaged: the vector in slot {slot} (tensor 'codes': scores NaN or Inf)")

    def _scan(self, prep: PreparedQueries, k: int) -> tuple[Tensor, Tensor]:
        """Running top-k of the code scores over the chunks: (scores (Q, k), slots (Q, k))."""
        nq = len(prep.bias)
        best = torch.empty(nq, 0)
        best_slots = torch.empty(nq, 0, dtype=torch.int64)
        step = max(self.chunk_size, _SCORES_PER_STEP // nq)  # few queries: longer chunks, same score memory
        for start in range(0, self.slots, step):
            stop = min(start + step, self.slots)
            codes, row_scale, live = self._chunk(start, stop)
            s = self._checked(self.codec.scores(prep, codes, row_scale), row_scale, live, start).cpu()  # (Q, m)
            if self._dead and not bool(live.all()):
                s[:, ~live] = -math.inf
            top = torch.topk(s, min(k, stop - start), dim=1)
            merged = torch.cat([best, top.values], dim=1)
            merged_slots = torch.cat([best_slots, top.indices + start], dim=1)
            best, idx = torch.topk(merged, min(k, merged.shape[1]), dim=1)
            best_slots = merged_slots.gather(1, idx)
        return best, best_slots

    def _scan_hamming(self, prep: PreparedQueries, k: int) -> tuple[Tensor, Tensor]:
        """Running Hamming top-k (``polyquant.kernels.hamming_topk``) over the chunks, ties to the smaller slot."""
        from polyquant.kernels import hamming_topk

        assert prep.bits is not None
        nq = len(prep.bits)
        best = torch.empty(nq, 0, dtype=torch.int64)  # keys distance << 40 | slot
        # the CPU engine reads the codes in place and keeps k + deleted candidates, so it takes long spans (fewer
        # calls) unless a span holds many deleted vectors
        span = self.chunk_size if prep.bits.device.type != "cpu" else max(self.chunk_size, _HAMMING_SPAN)
        start = 0
        while start < self.slots:
            stop = min(start + span, self.slots)
            codes, _, live = self._chunk(start, stop)
            dead = int((~live).sum()) if self._dead else 0
            if dead > self.chunk_size and stop - start > self.chunk_size:
                stop = start + self.chunk_size
                codes, live = codes[: self.chunk_size], live[: self.chunk_size]
                dead = int((~live).sum())
            chunk_start, start = start, stop
            if dead == stop - chunk_start:
                continue
            dist, idx = hamming_topk(prep.bits, codes.to(prep.bits.device), min(k + dead, stop - chunk_start))
            dist, idx = dist.cpu().long(), idx.cpu()
            keys = torch.where(live[idx], (dist << 40) | (idx + chunk_start), _BIG)
            merged = torch.cat([best, keys], dim=1)
            best = torch.topk(merged, min(k, merged.shape[1]), dim=1, largest=False).values
        dist, slots = best >> 40, best & ((1 << 40) - 1)
        return (self.codec.dim - 2 * dist).float() / self.codec.dim, slots

    def _rescore(self, q: Tensor, prep: PreparedQueries, slots: Tensor) -> Tensor:
        """Float-query scores of the candidate slots (Q, C): against the originals if kept, else the decoded codes."""
        unique, inverse = torch.unique(slots, return_inverse=True)
        if "originals" in self._rows:
            x, query, offset = self._rows["originals"].gather(unique), q, torch.zeros(len(q))  # (U, D)
            bad = ~((x.norm(dim=1) - 1).abs() <= 1e-3)  # stored unit rows; NaN, Inf or 3e38 is damage
            what = "tensor 'originals': not a unit vector"
        else:
            codes = self._rows["codes"].gather(unique)
            row_scale = self._rows["row_scale"].gather(unique) if "row_scale" in self._rows else None
            x, query, offset = self.codec.decode(codes, row_scale), prep.reduced.cpu(), prep.offset.cpu()  # (U, D')
            bad = ~torch.isfinite(x).all(dim=1)
            what = "tensor 'codes': decodes to NaN or Inf"
        if bool(bad.any()):
            raise ValueError(f"the store is damaged: the vector in slot {int(unique[bad][0])} ({what})")
        block = max(1, (1 << 24) // (slots.shape[1] * x.shape[1]))  # queries per step: <= 2^24 gathered values
        return torch.cat([offset[i : i + block, None] + torch.einsum("qd,qcd->qc", query[i : i + block],
                                                                      x[inverse[i : i + block]])
                          for i in range(0, len(slots), block)])

    # --- size ---------------------------------------------------------------------------------------------------

    def bytes_per_vector(self) -> float:
        """Stored bytes per live vector: codes (+ fp8 row scale, + original float32 vectors if kept) plus the codec
        and reduction tensors amortised over the live vectors. Ids (8 bytes) and live flags (1 byte) are not
        counted (bookkeeping, as in any vector database)."""
        per = self.codec.code_bytes() + (4 * self.dim if self.config.keep_originals else 0)
        return per + (self.codec.nbytes() + self.reducer.nbytes()) / max(1, len(self))

    # --- artifacts ----------------------------------------------------------------------------------------------

    def model_config(self) -> dict[str, Any]:
        """The float model's description (``models.build_model`` input): dims and text embedder."""
        return {"dim": self.dim, "embedder": self.embedder}

    def state(self) -> dict[str, Any]:
        """What the manifest records beyond the config (informative; checked on load)."""
        return {"slots": self.slots, "live": len(self), "reduced_dim": self.codec.dim, "format": self.codec.format,
                "scale": self.codec.scale}

    def tensors(self) -> dict[str, Tensor]:
        """The artifact's tensors: the row buffers (views, no copy) and the fitted ``codec.*`` / ``reduce.*``."""
        for rows in self._rows.values():
            rows.flush()
        out = {name: rows.view() for name, rows in self._rows.items()}
        out.update({f"codec.{k}": v for k, v in self.codec.tensors().items()})
        out.update({f"reduce.{k}": v for k, v in self.reducer.tensors().items()})
        if self.texts is not None:
            out.update({f"texts.{k}": v for k, v in self.texts.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, config: EmbeddingConfig, dim: int,
                     embedder: str | None = None, state: dict[str, Any] | None = None) -> EmbeddingStore:
        """Rebuild a store from ``tensors()`` output; ``ValueError`` naming the tensor if they do not fit: names,
        dtypes and shapes, the codec and reduction values (``Codec``, ``Reducer``: finite and bounded), a live id
        held twice, the manifest's counts, the offsets and ids of the optional ``texts.*`` (``TextTable``). The
        per-vector data (codes, row scales, originals, the texts' bytes) is checked where a search reads it
        (``search``, ``texts_of``), not here: a memory-mapped store is not read whole at load."""
        scale = getattr(config, "scale", "none")
        out_dim = config.reduced_dim(dim)
        reducer = Reducer(kind=config.reduce, in_dim=dim, out_dim=out_dim, matrix=tensors.get("reduce.matrix"),
                          mean=tensors.get("reduce.mean"))
        codec = Codec(format=config.FORMAT, dim=out_dim, scale=scale, step=tensors.get("codec.step"),
                      offset=tensors.get("codec.offset"))
        store = cls(config=config, reducer=reducer, codec=codec, embedder=embedder)
        layout = store._layout()
        known = set(layout) | {f"codec.{k}" for k in codec.tensors()} | {f"reduce.{k}" for k in reducer.tensors()}
        texts = {name.removeprefix("texts."): t for name, t in tensors.items() if name.startswith("texts.")}
        if texts:  # optional, all three or none (``TextTable``)
            known |= {f"texts.{k}" for k in TextTable.TENSORS}
        if set(tensors) != known:
            raise ValueError(f"tensors {sorted(set(tensors) ^ known)} do not match a {config.FORMAT} store")
        n = len(tensors["ids"])
        for name, (dtype, shape) in layout.items():
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != (n, *shape):
                raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {(n, *shape)}")
        store._init_rows({name: tensors[name] for name in layout})
        store.texts = TextTable.from_tensors(texts) if texts else None
        live_ids = store.ids()  # deleted slots may repeat an id, live ones may not
        if not bool((live_ids[1:] > live_ids[:-1]).all()):  # increasing ids (the default) need no sort
            live_ids = torch.sort(live_ids).values
            repeated = live_ids[1:][live_ids[1:] == live_ids[:-1]].unique()
            if len(repeated):
                raise ValueError(f"tensor 'ids' holds {len(repeated)} live ids more than once (first: "
                                 f"{int(repeated[0])})")
        store._dead = n - sum(int(live.sum()) for _, live in store._id_chunks())
        store._next_id = max((int(c.max()) + 1 for c, _ in store._id_chunks()), default=0)
        if state is not None and (state.get("slots"), state.get("live")) != (n, len(store)):
            raise ValueError(f"the manifest records {state.get('slots')} vectors ({state.get('live')} live), the "
                             f"tensors hold {n} ({len(store)} live)")
        return store

    def save(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None) -> Path:
        """Write the store as a polyquant artifact (atomic; ``polyquant.save``); ``polyquant.load`` reads it."""
        from polyquant.api import save

        importlib.import_module(f"{__package__}.methods")  # the impl module registers the handlers
        return save(self.quantized_model(), path, meta=meta)

    def quantized_model(self) -> Any:
        """This store as a ``polyquant.QuantizedModel`` (what the handler returns and ``save`` writes)."""
        from polyquant.api import QuantizedModel

        return QuantizedModel(self, self.config, state=self.state(), plugin=PLUGIN, method=self.method,
                              model_config=self.model_config())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = False, verify: bool = True) -> EmbeddingStore:
        """Load a saved store (``polyquant.artifact.load``).

        Args:
            path: the store's file.
            mmap: map the file instead of reading it (searches read the pages they touch).
            verify: check every tensor's sha256. A read load always does; with ``mmap`` it reads the whole file
                once through the mapping (``benchmarks/store_verify.py`` measures the cost), and ``verify=False``
                skips it: a corrupted store then gives wrong scores silently.

        The codec and reduction tensors and the ids are checked either way (``from_tensors``). Raises
        ``polyquant.artifact.ArtifactError`` naming the file for a damaged file or one that is not a store.
        """
        from polyquant.api import from_artifact
        from polyquant.artifact import ArtifactError
        from polyquant.artifact import load as load_artifact

        art = load_artifact(path, mmap=mmap, verify=verify if mmap else None)
        if art.plugin != PLUGIN:
            raise ArtifactError(f"{path}: not an embedding store (plugin {art.plugin!r}, method {art.method!r})")
        try:
            store = from_artifact(art).model
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
        assert isinstance(store, cls)
        return store

    def close(self) -> None:
        """Drop every vector and text and remove the working files; the store is then empty, with its buffers in
        RAM."""
        self._rows = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._init_rows({})
        self._dead, self._next_id = 0, 0
        self.texts = None

    def extra_repr(self) -> str:
        reduce = "" if self.reducer.kind == "none" else f", {self.reducer.kind} {self.dim}->{self.codec.dim}"
        return f"{self.codec.format}{reduce}, {len(self)} vectors ({self._dead} deleted)"


def _dim_of(x: Any) -> int:
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"vectors must be (N, D), got shape {shape}")
    return int(shape[1])


def _check_vectors(vectors: Any, dim: int, what: str) -> int:
    """The number of rows of a (N, dim) float array or tensor (checked without reading it)."""
    shape = tuple(getattr(vectors, "shape", ()))
    dtype = getattr(vectors, "dtype", None)
    if isinstance(dtype, torch.dtype):
        floating = dtype.is_floating_point
    else:
        floating = dtype is not None and bool(np.issubdtype(dtype, np.floating))
    if len(shape) != 2 or shape[1] != dim or not floating:
        raise ValueError(f"{what} must be float vectors (N, {dim}), got {dtype} {shape}")
    return int(shape[0])

