"""Train a shipped byte-level Mamba on the Python standard-library sources: Mamba-1
(``assets/byte_mamba.safetensors``) or Mamba-2 (``--version 2``: ``assets/byte_mamba2.safetensors``).

    python -m polyquant.plugins.ssm.train [--version 1] [--steps 200] [--seed 0]

Seeded (weights and batches); CPU, a few minutes. The held-out bits per byte are printed and stored in the
checkpoint's metadata. Not run in CI: the checkpoint is shipped.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch
import torch.nn.functional as F

from .mixer import replace_mixers
from .mixer2 import replace_mamba2_mixers
from .models import ARCH_DEFAULTS, ByteMamba, bits_per_byte, byte_batches, save_shipped, text_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", type=int, choices=(1, 2), default=1, help="1: Mamba-1, 2: Mamba-2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    arch = {**ARCH_DEFAULTS, "seed": args.seed, "version": args.version}
    model = ByteMamba(arch)
    # the same math as transformers' torch paths (tested), several times faster on a CPU
    replace_mixers(model) if args.version == 1 else replace_mamba2_mixers(model)
    train, test = text_bytes("train"), text_bytes("test")
    held_out = byte_batches(test, batches=8, batch_size=16, seq_len=args.seq_len, seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g_seed = args.seed + 1
    t0 = time.time()
    for step in range(args.steps):
        (ids,) = byte_batches(train, batches=1, batch_size=args.batch_size, seq_len=args.seq_len, seed=g_seed + step)
        model.train()
        logits = model(ids)[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item() / 0.6931:.3f} bits/byte  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    bpb = bits_per_byte(model, held_out)
    print(f"held-out bits per byte: {bpb:.4f} ({len(train)} train bytes, {len(test)} test bytes)")
    meta = {"version": args.version, "steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr, "held_out_bpb": round(bpb, 4), "python": sys.version.split()[0],
            "seconds": round(time.time() - t0)}
    hf = ByteMamba(arch)  # back to transformers' own modules: Mamba-1's dt_bias is dt_proj.bias there
    state = model.state_dict()
    if args.version == 1:
        state = {re.sub(r"mixer\.dt_bias$", "mixer.dt_proj.bias", k): v for k, v in state.items()}
    hf.load_state_dict(state, strict=True)
    print(f"held-out bits per byte (transformers mixer): {bits_per_byte(hf.eval(), held_out):.4f}")
    print(save_shipped(hf, arch, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
