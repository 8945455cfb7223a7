"""LoRA files for the tools users load them in (ai/common/lora_export.py) and the fit check of LoRA loading
(ai/common/pipelines.py ``load_lora``), on the tiny SDXL (CPU).

One LoRA is built in-process, as the trainer builds it (PEFT ``add_adapter`` on the UNet and both text encoders,
alpha != rank), with random non-zero B weights so that it changes every output, and text-encoder-1's last layer
left without LoRA (SDXL reads its penultimate hidden state). It is exported once per module.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from ai.common import lora_export
from ai.common.pipelines import LORA_ADAPTER_NAME, load_lora
from core.cli import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK, ALPHA = 4, 8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kohya's names (what ComfyUI's and A1111's key maps look up): the module path with "_" for ".", text encoders
# under text_model; each module has exactly these three tensors
_TENSOR = r"\.(lora_down\.weight|lora_up\.weight|alpha)"
KOHYA_KEY = {
    "unet": re.compile(
        r"lora_unet_(down_blocks_\d+_attentions_\d+|mid_block_attentions_\d+|up_blocks_\d+_attentions_\d+)_"
        r"(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
        + _TENSOR
    ),
    "text_encoder": re.compile(
        r"lora_te1_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])" + _TENSOR
    ),
    "text_encoder_2": re.compile(
        r"lora_te2_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])" + _TENSOR
    ),
}
# diffusers/PEFT names as StableDiffusionXLPipeline.load_lora_weights and ComfyUI's diffusers key map read them
DIFFUSERS_KEY = {
    "unet": re.compile(r"unet\.(down_blocks|mid_block|up_blocks)\.[\w.]+\.lora_[AB]\.weight"),
    "text_encoder": re.compile(
        r"text_encoder\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.lora_[AB]\.weight"
    ),
    "text_encoder_2": re.compile(
        r"text_encoder_2\.text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
        r"\.lora_[AB]\.weight"
    ),
}


def components(model: Path):
    from ai.common.models import load_components

    return load_components(str(model))


def pipeline(model: Path):
    from diffusers import StableDiffusionXLPipeline

    c = components(model)
    return StableDiffusionXLPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=c.scheduler,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(model):
    """The tiny SDXL with a LoRA on the UNet and both text encoders, as training leaves it."""
    import torch
    from peft import LoraConfig

    c = components(model)
    last = c.text_encoder.config.num_hidden_layers - 1

    def config(targets, **extra):
        return LoraConfig(
            r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets, **extra
        )

    c.unet.add_adapter(config(UNET_TARGETS))
    c.text_encoder.add_adapter(config(TE_TARGETS, exclude_modules=rf".*layers\.{last}\..*"))
    c.text_encoder_2.add_adapter(config(TE_TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (c.unet, c.text_encoder, c.text_encoder_2):
            for name, param in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero, a LoRA that changes nothing
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return c


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora_export")
    written = lora_export.save_lora(folder, trained.unet, trained.text_encoder, trained.text_encoder_2)
    assert [p.name for p in written] == [lora_export.DIFFUSERS_NAME, lora_export.KOHYA_NAME]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in written
    )  # no temporary files left
    return {"diffusers": written[0], "kohya": written[1]}


def trained_modules(trained) -> dict[str, set[str]]:
    return {c: lora_export.adapted_modules(getattr(trained, c), "default") for c in COMPONENTS}


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def rewrite(path: Path, out: Path, rename=lambda k: k, drop=lambda k: False, add=None) -> Path:
    """A copy of a LoRA file (its metadata kept) with keys renamed, dropped or added."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as fh:
        metadata = fh.metadata()
    state = {rename(k): v for k, v in tensors(path).items() if not drop(k)}
    save_file({**state, **(add or {})}, out, metadata=metadata)
    return out


def test_every_kohya_and_diffusers_key_has_the_standard_name(trained, exported):
    modules = trained_modules(trained)
    last = trained.text_encoder.config.num_hidden_layers - 1
    assert not any(f"layers.{last}." in m for m in modules["text_encoder"])  # the fixture's premise
    assert all(len(m) > 0 for m in modules.values())

    kohya = tensors(exported["kohya"])
    prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    found: dict[str, dict[str, set[str]]] = {c: {} for c in COMPONENTS}
    for key in kohya:
        component = next(c for p, c in prefixes.items() if key.startswith(p))
        assert KOHYA_KEY[component].fullmatch(key), key
        module, tensor = key.split(".", 1)
        found[component].setdefault(module, set()).add(tensor)
    for component in COMPONENTS:
        assert all(t == {"lora_down.weight", "lora_up.weight", "alpha"} for t in found[component].values())
        assert len(found[component]) == len(modules[component]), component  # one kohya module per trained one
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {float(ALPHA)}
    q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya[f"{q}.lora_down.weight"].shape == (RANK, trained.text_encoder.config.hidden_size)

    diffusers = tensors(exported["diffusers"])
    for component in COMPONENTS:
        keys = [k for k in diffusers if k.split(".", 1)[0] == component]
        assert len(keys) == 2 * len(modules[component]), component
        bad = [k for k in keys if not DIFFUSERS_KEY[component].fullmatch(k)]
        assert not bad, bad[:3]


def outputs(pipe) -> dict:
    """Each component's output on fixed inputs: every hidden state of both text encoders, the UNet's prediction."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size - 1, (1, 7), generator=generator)
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=generator)
    context = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=generator)
    added = {
        "text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    with torch.no_grad():
        return {
            "text_encoder": torch.stack(pipe.text_encoder(ids, output_hidden_states=True).hidden_states),
            "text_encoder_2": torch.stack(pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states),
            "unet": pipe.unet(latents, 500, context, added_cond_kwargs=added).sample,
        }


@pytest.fixture(scope="module")
def reference(trained, model) -> dict:
    """Outputs of the base model and of the model the LoRA was trained on."""
    return {"base": outputs(pipeline(model)), "trained": outputs(trained)}


def old_format(exported, name: str, tmp_path: Path) -> Path:
    """What the export wrote before text-encoder-1 got its ``text_model`` prefix back."""
    if name == "old_diffusers":
        return rewrite(exported["diffusers"], tmp_path / "old.safetensors",
                       rename=lambda k: k.replace("text_encoder.text_model.", "text_encoder."))  # fmt: skip
    return rewrite(exported["kohya"], tmp_path / "old_kohya.safetensors",
                   rename=lambda k: k.replace("lora_te1_text_model_", "lora_te1_"))  # fmt: skip


@pytest.mark.parametrize(
    ("name", "fuse"), [("diffusers", False), ("kohya", False), ("kohya", True), ("old_diffusers", False),
                       ("old_kohya", False)],
)  # fmt: skip
def test_loading_the_file_applies_every_trained_module_and_reproduces_the_trained_model(
    trained, exported, reference, model, tmp_path, name, fuse
):
    import torch

    path = exported[name] if name in exported else old_format(exported, name, tmp_path)
    pipe = pipeline(model)
    modules = trained_modules(trained)
    if not fuse:
        counts = load_lora(pipe, path, 1.0, fuse=False)
        assert counts == {c: len(modules[c]) for c in COMPONENTS}
        # the same modules, by name, as in the model it was trained on (text-encoder-1's last layer has none)
        assert {
            c: lora_export.adapted_modules(getattr(pipe, c), LORA_ADAPTER_NAME) for c in COMPONENTS
        } == modules
    else:
        load_lora(pipe, path, 1.0, fuse=True)
    got = outputs(pipe)
    for component in COMPONENTS:
        want, base = reference["trained"][component], reference["base"][component]
        assert (want - base).abs().max() > 1e-2, component  # the LoRA changes this component's output
        if fuse:  # merged weights round differently: far closer than the LoRA's effect, not bit-equal
            assert (got[component] - want).abs().max() < 1e-2 * (want - base).abs().max(), component
        else:
            torch.testing.assert_close(got[component], want, rtol=1e-5, atol=1e-6, msg=f"{name} {component}")


class Capture(logging.Handler):
    """diffusers' log records (its library logger does not propagate to the root logger that caplog watches)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_log():
    handler = Capture()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_a_fitting_lora_loads_quietly_and_counts_what_it_applied(
    trained, exported, model, tmp_path, diffusers_log
):
    import warnings

    unet_only = rewrite(exported["diffusers"], tmp_path / "unet_only.safetensors",
                        drop=lambda k: not k.startswith("unet."))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = load_lora(pipeline(model), unet_only, 0.5, fuse=False)
        assert load_lora(pipeline(model), exported["kohya"], 1.0, fuse=False)["text_encoder"] == len(
            trained_modules(trained)["text_encoder"]
        )
    assert counts == {"unet": len(trained_modules(trained)["unet"])}
    assert diffusers_log == []  # not even "No LoRA keys associated to CLIPTextModel" for the UNet-only file
    assert [str(w.message) for w in caught if "lora" in str(w.message).lower()] == []


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # the refused files
def test_a_lora_that_only_partly_fits_is_refused_with_its_key_names(exported, model, tmp_path, diffusers_log):
    import torch

    renamed = rewrite(exported["diffusers"], tmp_path / "renamed.safetensors",
                      rename=lambda k: k.replace(".attn2.to_k.", ".attn2.to_kk."))  # fmt: skip
    kohya_renamed = rewrite(exported["kohya"], tmp_path / "kohya_renamed.safetensors",
                            rename=lambda k: k.replace("_attn2_to_k.", "_attn2_to_kk."))  # fmt: skip
    other_arch = rewrite(exported["diffusers"], tmp_path / "flux.safetensors", add={
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, RANK),
    })  # fmt: skip
    no_unet_module = rewrite(exported["diffusers"], tmp_path / "nothing_fits.safetensors",
                             rename=lambda k: k.replace("unet.", "unet.model.diffusion_model."))  # fmt: skip
    n_attn2 = sum(
        k.startswith("unet.") and ".attn2.to_k.lora_A." in k for k in tensors(exported["diffusers"])
    )
    n_unet = sum(k.startswith("unet.") and ".lora_A." in k for k in tensors(exported["diffusers"]))
    cases = [
        (renamed, [f"{n_attn2} of its", "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_kk"]),
        (kohya_renamed, [f"{n_attn2} of its", "attn2.to.kk"]),  # named as diffusers reads the kohya key
        (
            other_arch,
            ["2 keys belong to no part", "transformer.single_transformer_blocks.0.attn.to_q.lora_A"],
        ),
        (no_unet_module, [f"{n_unet} of its", "unet.model.diffusion_model.down_blocks.1.attentions.0"]),
    ]
    for path, expected in cases:
        pipe = pipeline(model)
        with pytest.raises(UserError) as err:
            load_lora(pipe, path, 1.0, fuse=False)
        message = str(err.value)
        assert message.startswith(f"{path} does not fit this base model: "), message
        assert (
            all(e in message for e in expected)
            and "Use the SDXL base model the LoRA was trained on" in message
        )
        assert all(not lora_export.adapted_modules(getattr(pipe, c), LORA_ADAPTER_NAME) for c in COMPONENTS)
    # diffusers' own warning about the keys it could not place is no longer hidden
    assert any("unexpected keys" in m and "to_kk" in m for m in diffusers_log)
