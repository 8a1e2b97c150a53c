"""The shipped pocket model: loaded by the normal loader like a real SD1.5 folder, samples quickly,
and its samples follow prompts; `spo pocket sample` writes a PNG."""

import json

import numpy as np
import pytest
from spo_studio.backend.models import POCKET_DIR, load_model

pytestmark = pytest.mark.skipif(not (POCKET_DIR / "model_index.json").exists(), reason="pocket model not built")


def test_shipped_pocket_model_is_an_sd15_folder_and_small():
    model = load_model("pocket", device="cpu")
    assert model.family == "sd15" and model.default_resolution == 64
    assert type(model.unet).__name__ == "UNet2DConditionModel" and type(model.vae).__name__ == "AutoencoderKL"
    assert type(model.text_encoders[0]).__name__ == "CLIPTextModel"
    size_mb = sum(f.stat().st_size for f in POCKET_DIR.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 40
    same = load_model(str(POCKET_DIR), device="cpu")  # the same folder through the generic folder path
    assert same.family == "sd15"


def test_pocket_samples_follow_their_prompts():
    from spo_studio.backend.pocket import judges
    from spo_studio.backend.pocket.report import sample_uint8

    model = load_model("pocket", device="cpu")
    prompts = ["a red circle on a blue background", "a yellow square on a purple background",
               "a white star on a green background", "a blue triangle on a white background"] * 2
    images = sample_uint8(model, prompts, list(range(len(prompts))))
    assert images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    verdicts = judges.alignment_batch(images, prompts)
    bg_right = np.mean([v["bg_ok"] for v in verdicts])
    assert bg_right >= 0.75, verdicts  # backgrounds are the easiest part of a prompt
    assert np.std(np.stack(images).astype(float)) > 10  # not a blank image


def test_pocket_sample_cli(tmp_path):
    from PIL import Image
    from spo_studio.backend.cli import main

    out = tmp_path / "x.png"
    assert main(["pocket", "sample", "a red circle on a blue background", "--out", str(out), "--steps", "8"]) == 0
    with Image.open(out) as im:
        assert im.size == (256, 256)
    assert main(["pocket", "sample", "a red dragon", "--out", str(out)]) == 2  # outside the grammar: clear error


def test_pocket_build_record_documents_the_build():
    record = json.loads((POCKET_DIR / "pocket_build.json").read_text())
    assert record["seconds_total"] > 0 and record["parameters"]["unet"] > 1e6


def test_encoder_refit_moves_only_the_encoder_and_lowers_the_round_trip_error():
    """`spo pocket build --stage encoder`: the VAE encoder learns to invert the decoder on its own outputs for latents
    it was not trained on (as the pocket model's samples are), and nothing the sampler uses (the decoder) changes."""
    import torch
    from spo_studio.backend.pocket import world
    from spo_studio.backend.pocket.base_model import PocketModelConfig, refit_encoder, round_trip_l1, train_vae

    cfg = PocketModelConfig(image_size=32, vae_channels=(16, 16), vae_steps=60, vae_batch=8, vae_crop=16,
                            encoder_steps=100, encoder_batch=8, encoder_lr=3e-3)
    renders = torch.from_numpy(np.stack([s.image for s in world.samples(16, 0, image_size=32)]))
    renders = renders.permute(0, 3, 1, 2).float() / 255
    vae = train_vae(cfg, renders)
    with torch.no_grad():  # the model's "samples": decoder outputs of latents the encoder never produces
        z = vae.encode(renders * 2 - 1).latent_dist.mean
        z = z + 0.5 * z.std() * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
        samples = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    l1_before = round_trip_l1(vae, samples)
    info = refit_encoder(cfg, vae, samples, renders)
    after = vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("encoder.", "quant_conv.")) for k in moved), sorted(moved)[:5]
    assert info["round_trip_l1_before"] == pytest.approx(l1_before)
    assert info["round_trip_l1_after"] == pytest.approx(round_trip_l1(vae, samples))
    assert info["round_trip_l1_after"] < 0.8 * l1_before, info
    assert not any(p.requires_grad for p in vae.parameters())


def test_gradient_l1_by_hand_and_a_vae_of_other_latent_size():
    import torch
    from spo_studio.backend.pocket.base_model import PocketModelConfig, gradient_l1, make_vae

    x = torch.tensor([[[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]]])  # [1, 1, 2, 3]
    y = torch.zeros_like(x)
    # horizontal differences (1, 2, 0, 0): mean 0.75; vertical (0, 1, 3): mean 4/3
    assert gradient_l1(x, y).item() == pytest.approx((0.75 + 4 / 3) / 2)
    assert gradient_l1(y + 5, y).item() == 0.0  # a constant offset has no gradient
    vae = make_vae(PocketModelConfig(vae_latent_channels=8, vae_channels=(32, 64)))
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 8, 32, 32)


def test_block_orders_put_cross_attention_where_sd15_has_it():
    """'sd15' order: attention at the 16×16 level and in the mid block, none at the lowest level's blocks."""
    from spo_studio.backend.pocket.base_model import PocketModelConfig, block_order_of, make_unet

    cfg = PocketModelConfig(unet_channels=(32, 64), text_hidden=32, block_order="sd15")
    unet = make_unet(cfg, 16)
    assert block_order_of(unet) == "sd15"
    attn_at = {name.split(".attentions")[0] for name, _ in unet.named_modules() if name.endswith("attn2")}
    assert attn_at == {"down_blocks.0", "mid_block", "up_blocks.1"}
    assert block_order_of(make_unet(PocketModelConfig(unet_channels=(32, 64), text_hidden=32), 16)) == "pocket"
    with pytest.raises(ValueError, match="block_order must be one of pocket, sd15; got 'sdxl'"):
        make_unet(PocketModelConfig(block_order="sdxl"), 16)


def test_transplant_keeps_every_shared_weight_and_starts_new_attention_as_the_identity():
    import torch
    from spo_studio.backend.pocket.base_model import PocketModelConfig, block_order_of, make_unet, transplant_unet

    torch.manual_seed(0)
    small = dict(unet_channels=(32, 64), text_hidden=32)
    old = make_unet(PocketModelConfig(**small), 16).eval()
    new, counts = transplant_unet(old, PocketModelConfig(**small, block_order="sd15"))
    assert block_order_of(new) == "sd15"
    old_state, new_state = old.state_dict(), new.state_dict()
    shared = [k for k in new_state if ".attentions." not in k or k.startswith("mid_block")]
    assert counts["copied"] == len(shared) and counts["new"] == len(new_state) - len(shared)
    for k in shared:
        assert torch.equal(new_state[k], old_state[k]), k

    seen = []

    def identity_check(module, inputs, output):
        seen.append(torch.equal(output[0], inputs[0]))

    hooks = [new.get_submodule(f"{block}.attentions.0").register_forward_hook(identity_check)
             for block in ("down_blocks.0", "up_blocks.1")]
    x, t, h = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 16, 32)
    with torch.no_grad():
        new(x, t, encoder_hidden_states=h)
    for hook in hooks:
        hook.remove()
    assert seen == [True, True]  # each new transformer adds a zero residual

    same, counts = transplant_unet(old, PocketModelConfig(**small))  # same order: an exact copy
    assert counts == {"copied": len(old_state), "new": 0, "dropped": 0}
    with torch.no_grad():
        assert torch.equal(same(x, t, encoder_hidden_states=h).sample, old(x, t, encoder_hidden_states=h).sample)
