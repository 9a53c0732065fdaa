"""Our EnCodec-style RVQ against vector-quantize-pytorch's ResidualVQ configured the same way (the reference oracle):
at equal bits on the same training stream it must match or beat it on held-out SQNR with under 5% dead codes, and
it needs its k-means init and dead-code restart to get there (the ablation). Small: K = 64, 2 000 frames."""

from __future__ import annotations

import pytest
import torch

from polyquant.plugins.audio.metrics import code_usage, sqnr
from polyquant.vq import CODEBOOK_PRESETS, ResidualVQ

vqp = pytest.importorskip("vector_quantize_pytorch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered, anisotropic 16-d frames (a mixture of 40 Gaussians): train (2000) and held out (1000)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, 16, generator=g) * torch.linspace(3, 0.3, 16)
    def draw(n: int) -> torch.Tensor:
        return centers[torch.randint(0, 40, (n,), generator=g)] + 0.4 * torch.randn(n, 16, generator=g)
    return draw(2000), draw(1000)


def _train(q: torch.nn.Module, stream: list[torch.Tensor], oracle: bool) -> None:
    q.train()
    with torch.no_grad():
        for x in stream:
            q(x[None] if oracle else x)
    q.eval()


def _ours(seed: int, kmeans: bool, restart: bool) -> ResidualVQ:
    return ResidualVQ(dim=16, num_quantizers=3, codebook_size=64, decay=0.99, kmeans_init=kmeans, kmeans_iters=50,
                      threshold_dead_code=2.0 if restart else 0.0, seed=seed, options=CODEBOOK_PRESETS["encodec"])


@pytest.mark.parametrize("seed", [0, 1])
def test_rvq_matches_the_oracle_and_needs_kmeans_and_restart(seed: int) -> None:
    train, held = _data(seed)
    g = torch.Generator().manual_seed(100 + seed)
    stream = [train[torch.randint(0, len(train), (512,), generator=g)] for _ in range(60)]
    results = {}
    for label, kmeans, restart in (("ours", True, True), ("no restart", True, False), ("neither", False, False)):
        q = _ours(seed, kmeans, restart)
        _train(q, stream, oracle=False)
        codes = q.encode(train)
        dead = max(code_usage(codes[:, i], 64)[1] for i in range(3))
        results[label] = (sqnr(q.decode(q.encode(held)), held), dead)
    torch.manual_seed(seed)
    oracle = vqp.ResidualVQ(dim=16, num_quantizers=3, codebook_size=64, decay=0.99, kmeans_init=True,
                            kmeans_iters=50, threshold_ema_dead_code=2, rotation_trick=False)
    _train(oracle, stream, oracle=True)
    with torch.no_grad():
        x_hat, _, _ = oracle(held[None])
    oracle_sqnr = sqnr(x_hat[0], held)
    ours_sqnr, ours_dead = results["ours"]
    assert ours_sqnr >= oracle_sqnr - 0.3, (results, oracle_sqnr)  # matches or beats the oracle
    assert ours_dead < 0.05, results
    assert ours_sqnr > results["neither"][0] + 1.0, results  # k-means init + restart are what get it there
    assert results["neither"][1] > ours_dead
