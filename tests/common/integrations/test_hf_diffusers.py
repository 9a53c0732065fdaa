"""``polyquant.integrations.diffusers`` (issue 30 item 3): a quantized diffusers model saved as a diffusers folder
(``config.json`` + ``polyquant.safetensors``, no float weights) and a whole ``DiTPipeline`` folder, loaded back in
a fresh process (``load_quantized``, ``from_pretrained``) with the outputs and samples of the in-memory model.

The model: the diffusion plugin's ``example("int8")`` (the shipped digits DiT inside a ``DiTDenoiser``: the folder
holds its ``.transformer``, rebuilt at load by the plugin). The pipeline: a real diffusers ``DiTPipeline`` around the
same shipped DiT (pixel space: 8x8x1 "latents") with a tiny random 1-channel ``AutoencoderKL`` (no down-sampling),
quantized in place by the plugin's ``quantize_pipeline`` (a bare transformer: ``load_quantized`` restores it into
the ``from_config`` skeleton of its ``config.json``). Guidance stays 1: DiTPipeline's null class is ImageNet's 1000.
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

pytest.importorskip("diffusers")

import polyquant as pq  # noqa: E402
from polyquant.integrations import diffusers as pqd  # noqa: E402
from polyquant.plugins import load as load_plugin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACKED_RTOL = 1e-3  # as the contract test: packed layers agree with fake-quant to float32 rounding per layer

# The fresh process: loads the model folder (fake and packed) and the pipeline folder, writes outputs and samples.
FRESH = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from polyquant.integrations import diffusers as pqd
from polyquant.plugins.diffusion.models import noise_prediction

torch.set_num_threads(1)
root = sys.argv[1]
inputs = load_file(f"{root}/inputs.safetensors")
fake = pqd.load_quantized(f"{root}/model")
packed = pqd.load_quantized(f"{root}/model/polyquant.safetensors", mode="packed", cpu_dtype=torch.float32)
pipe = pqd.from_pretrained(f"{root}/pipe")
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    out = {"fake": noise_prediction(fake, **inputs), "packed": noise_prediction(packed, **inputs)}
out["samples"] = pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      guidance_scale=1.0, output_type="pt").images
save_file({k: v.contiguous() for k, v in out.items()}, f"{root}/outputs.safetensors")
print(json.dumps({"model": type(fake).__name__, "pipeline": type(pipe).__name__,
                  "packed_layer": type(packed.transformer_blocks[0].ff.net[2]).__name__}))
"""


def _sample(pipe: Any) -> torch.Tensor:  # the same call as FRESH's
    return pipe(class_labels=[1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                guidance_scale=1.0, output_type="pt").images


def _dit_pipeline(transformer: torch.nn.Module) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,),
                            layers_per_block=1, norm_num_groups=8, sample_size=8)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Quantize, save both folders, load them in a fresh process; the in-memory references and what came back."""
    from safetensors.torch import load_file, save_file

    from polyquant.plugins.diffusion.baselines import Int8Config
    from polyquant.plugins.diffusion.pipeline import quantize_pipeline

    root = tmp_path_factory.mktemp("hf_diffusers")
    ex = load_plugin("diffusion").example("int8")
    pipe = _dit_pipeline(copy.deepcopy(ex.model.transformer))
    qm = pq.quantize(ex.model, ex.config, calib=ex.calib)
    qm_pipe = quantize_pipeline(pipe, Int8Config(), run=_sample, progress=False)
    with torch.no_grad():
        ref = qm.model(ex.inputs)
        samples = _sample(pipe)
    pqd.save_pretrained(qm, root / "model")
    pqd.save_pipeline(pipe, qm_pipe, root / "pipe")
    save_file(ex.inputs, root / "inputs.safetensors")
    done = subprocess.run([sys.executable, "-c", FRESH, str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "qm": qm, "pipe": pipe, "ref": ref, "samples": samples,
            "info": json.loads(done.stdout.strip().splitlines()[-1]), "out": load_file(root / "outputs.safetensors")}


def test_model_folder_holds_config_and_artifact_only(saved: dict[str, Any]) -> None:
    folder = saved["root"] / "model"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "polyquant.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and config["num_layers"] == 4
    assert pq.load(folder / "polyquant.safetensors").config == saved["qm"].config  # a plain polyquant artifact too


def test_load_quantized_in_a_fresh_process(saved: dict[str, Any]) -> None:
    assert saved["info"]["model"] == "DiTTransformer2DModel"  # the diffusers model, out of the plugin's DiTDenoiser
    assert torch.equal(saved["out"]["fake"], saved["ref"])
    assert saved["info"]["packed_layer"] == "W8A8Linear"
    err = float((saved["out"]["packed"] - saved["ref"]).norm() / saved["ref"].norm())
    assert err <= PACKED_RTOL


def test_pipeline_round_trip_in_a_fresh_process(saved: dict[str, Any]) -> None:
    folder = saved["root"] / "pipe"
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == ["config.json", "polyquant.safetensors"]
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == ["diffusers",
                                                                                     "DiTTransformer2DModel"]
    assert saved["info"]["pipeline"] == "DiTPipeline"
    assert torch.equal(saved["out"]["samples"], saved["samples"])


def test_pipe_transformer_assignment(saved: dict[str, Any]) -> None:
    # the documented one-liner: a float pipeline gets the quantized transformer of a folder
    from polyquant.plugins.diffusion.models import build_model

    pipe = _dit_pipeline(build_model({"name": "digits-dit"}))  # float
    pipe.transformer = pqd.load_quantized(saved["root"] / "pipe" / "transformer")
    assert torch.equal(_sample(pipe), saved["samples"])


def test_missing_files_are_named(saved: dict[str, Any], tmp_path: Path) -> None:
    model = saved["root"] / "model"
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "polyquant.safetensors").write_bytes((model / "polyquant.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no_config/config\.json: not found"):
        pqd.load_quantized(tmp_path / "no_config")
    (tmp_path / "no_artifact").mkdir()
    (tmp_path / "no_artifact" / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no_artifact/polyquant\.safetensors: not found"):
        pqd.load_quantized(tmp_path / "no_artifact")
    with pytest.raises(FileNotFoundError, match="model_index.json: not found"):
        pqd.from_pretrained(model)


def test_saving_over_float_weights_is_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "float"
    folder.mkdir()
    files = {"config.json": b'{"_class_name": "DiTTransformer2DModel"}', "diffusion_pytorch_model.safetensors": b"x"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(ValueError, match="already holds float weights"):
        pqd.save_pretrained(saved["qm"], folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files  # untouched, no artifact written
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        pqd.save_pipeline(saved["pipe"], saved["qm"], tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_what_cannot_be_saved(saved: dict[str, Any], tmp_path: Path) -> None:
    qm = saved["qm"]
    with pytest.raises(ValueError, match="not part of the quantized model"):  # pipe.transformer is another qm's
        pqd.save_pipeline(saved["pipe"], qm, tmp_path / "other")
    assert not (tmp_path / "other").exists()

    class Cached(torch.nn.Module):  # a wrapper with state of its own: the diffusers model alone is not the model
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer
            self.register_buffer("cache", torch.zeros(2))

    wrapped = pq.QuantizedModel(Cached(qm.model.transformer), qm.config, model_config=qm.model_config)
    with pytest.raises(ValueError, match="holds state outside its diffusers model 'transformer' \\(cache\\)"):
        pqd.save_pretrained(wrapped, tmp_path / "cached")
    with pytest.raises(ValueError, match="has 0 diffusers models"):
        pqd.save_pretrained(pq.QuantizedModel(torch.nn.Linear(2, 2), qm.config), tmp_path / "none")
    assert not (tmp_path / "cached").exists() and not (tmp_path / "none").exists()
