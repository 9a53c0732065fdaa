"""``polyquant.integrations.transformers`` (issue 30 item 3): a quantized transformers model saved as a
transformers folder (``config.json`` with ``architectures`` + ``polyquant.safetensors``, no float weights) and
loaded back in a fresh process by ``from_pretrained`` with the outputs of the in-memory model.

Two models of the ssm plugin's ``example("naive")`` (the shipped byte-level Mamba, W8A8): the plugin's ``MambaLM``
quantized as the example does (the folder holds its ``.lm``, a ``MambaForCausalLM``, rebuilt at load by the
plugin), and the bare ``MambaForCausalLM`` quantized directly (restored into the skeleton of ``config.json``).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import polyquant as pq  # noqa: E402
from polyquant.integrations import transformers as pqt  # noqa: E402
from polyquant.plugins import load as load_plugin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACKED_RTOL = 1e-3  # as the contract test: packed layers agree with fake-quant to float32 rounding per layer

FRESH = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from polyquant.integrations import transformers as pqt

torch.set_num_threads(1)
root = sys.argv[1]
ids = load_file(f"{root}/inputs.safetensors")["ids"]
wrapped = pqt.from_pretrained(f"{root}/wrapped")
bare = pqt.from_pretrained(f"{root}/bare")
packed = pqt.from_pretrained(f"{root}/bare", mode="packed", cpu_dtype=torch.float32)
with torch.no_grad():
    out = {name: m(input_ids=ids, use_cache=False).logits for name, m in
           (("wrapped", wrapped), ("bare", bare), ("packed", packed))}
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/outputs.safetensors")
print(json.dumps({"wrapped": type(wrapped).__name__, "bare": type(bare).__name__,
                  "in_proj": type(packed.backbone.layers[0].mixer.in_proj).__name__}))
"""


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Quantize both, save both folders, load them in a fresh process; the references and what came back."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hf_transformers")
    ex = load_plugin("ssm").example("naive")
    bare_lm = copy.deepcopy(ex.model.lm)
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib)
    qm_bare = pq.quantize(bare_lm, ex.config, calib=ex.calib)
    assert qm.model_config is not None and qm_bare.model_config is None  # a user's model: no plugin description
    pqt.save_pretrained(qm, root / "wrapped")
    pqt.save_pretrained(qm_bare, root / "bare")
    save_file({"ids": ex.inputs}, root / "inputs.safetensors")
    done = subprocess.run([sys.executable, "-c", FRESH, str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        ref = qm.model(ex.inputs)  # the plugin's MambaLM: lm's logits
    return {"root": root, "qm": qm, "ref": ref, "ref_bare": _logits(qm_bare.model, ex.inputs),
            "info": json.loads(done.stdout.strip().splitlines()[-1]), "out": load_file(root / "outputs.safetensors")}


def test_folder_holds_config_and_artifact_only(saved: dict[str, Any]) -> None:
    from transformers import AutoConfig

    for name in ("wrapped", "bare"):
        folder = saved["root"] / name
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "polyquant.safetensors"]
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        assert config.model_type == "mamba" and config.architectures == ["MambaForCausalLM"]


def test_from_pretrained_in_a_fresh_process(saved: dict[str, Any]) -> None:
    assert saved["info"]["wrapped"] == saved["info"]["bare"] == "MambaForCausalLM"
    assert torch.equal(saved["out"]["wrapped"], saved["ref"])
    assert torch.equal(saved["out"]["bare"], saved["ref_bare"])
    assert saved["info"]["in_proj"] == "W8A8Linear"
    err = float((saved["out"]["packed"] - saved["ref_bare"]).norm() / saved["ref_bare"].norm())
    assert err <= PACKED_RTOL


def test_errors(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "float"
    folder.mkdir()
    files = {"config.json": b"{}", "model.safetensors": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(ValueError, match=r"already holds float weights \(model\.safetensors\)"):
        pqt.save_pretrained(saved["qm"], folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "polyquant.safetensors").write_bytes(
        (saved["root"] / "bare" / "polyquant.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no_config/config\.json: not found"):
        pqt.from_pretrained(tmp_path / "no_config")
    with pytest.raises(FileNotFoundError, match=r"float/polyquant\.safetensors: not found"):
        pqt.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        pqt.from_pretrained(tmp_path / "missing")
