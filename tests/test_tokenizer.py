"""Tests of tokenizer.py: the VQ image tokenizer and the toy text tokenizer.
Run: python -m pytest -q tests/test_tokenizer.py   (CPU, well under a minute)"""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shapes
import tokenizer
from common import to_tensor, to_uint8
from tokenizer import (VQ_PRESETS, TextTokenizer, VQConfig, VQModel, codebook_usage, load_vq, main,
                       restart_dead_codes)

# a copy of shared/reference/janus_pro_state_dict_shapes.json, kept in the repo so CI always has it
SHAPES_JSON = os.path.join(os.path.dirname(__file__), "data", "janus_pro_state_dict_shapes.json")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return VQModel(VQ_PRESETS["tiny"])


# -----------------------------------------------------------------------------
# VQ model


def test_encode_decode_shapes_and_code_range():
    for name, batch in (("tiny", 3), ("toy", 2), ("small", 2)):
        cfg = VQ_PRESETS[name]
        model = VQModel(cfg).eval()
        x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
        codes = model.encode(x)
        assert codes.shape == (batch, cfg.num_tokens) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < cfg.codebook_size
        assert model.decode(codes).shape == x.shape
    assert (VQ_PRESETS["toy"].grid, VQ_PRESETS["tiny"].grid, VQ_PRESETS["small"].grid, VQ_PRESETS["vq16"].grid) == (4, 4, 8, 24)


def test_codes_are_nearest_unit_codes_in_raster_order():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(x)  # (2, 16)
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))  # (2, 8, 4, 4)
        e = F.normalize(model.quantize.embedding.weight, dim=-1)
    for b, r, c in [(0, 0, 0), (0, 0, 3), (1, 2, 1), (1, 3, 3)]:
        zz = F.normalize(z[b, :, r, c], dim=0)
        assert codes[b, r * 4 + c] == ((zz - e) ** 2).sum(1).argmin()  # index = row * w + col


def test_toy_encoder_is_patch_local():
    """A code of the toy tokenizers depends on its own patch only: the same pixels give the same
    code wherever they sit and whatever surrounds them (LlamaGen's encoder gives neither)."""
    for name in ("toy", "tiny", "small"):
        cfg = VQ_PRESETS[name]
        assert cfg.local_encoder
        torch.manual_seed(0)
        model = VQModel(cfg).eval()
        f, g = cfg.image_size // cfg.grid, cfg.grid
        x = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 2 - 1
        y = x.clone()
        y[:, :, f:2 * f, 2 * f:3 * f] = -x[:, :, f:2 * f, 2 * f:3 * f]  # change patch (1, 2)
        y[:, :, 0:f, 0:f] = x[:, :, (g - 1) * f:, (g - 1) * f:]  # patch (0, 0) := patch (g-1, g-1)
        with torch.no_grad():
            zx, zy = model.encoder(x), model.encoder(y)
        changed = (zx - zy).abs().amax(1)[0] > 0  # (g, g)
        want = torch.zeros(g, g, dtype=torch.bool)
        want[1, 2] = want[0, 0] = True
        assert torch.equal(changed, want)
        assert torch.allclose(zy[0, :, 0, 0], zx[0, :, g - 1, g - 1], atol=1e-5)
    assert not VQ_PRESETS["vq16"].local_encoder  # the real VQ-16 keeps LlamaGen's encoder
    # so even an untrained patch-local tokenizer gives the white background exactly one code
    torch.manual_seed(0)
    ev, _, _ = tokenizer.vq_metrics(VQModel(VQ_PRESETS["tiny"]), 10, 32)
    assert ev["background_codes"] == 1
    assert 0 <= ev["code_entropy"] <= math.log(ev["usage"] * 256) + 1e-9  # at most log(codes used)


def test_straight_through_gradient_and_codebook_loss():
    q = tiny_model().quantize
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    z_st, codes, vq_loss, latents = q(z)
    # forward value: exactly the chosen (unit) codes
    e = F.normalize(q.embedding.weight, dim=-1)
    assert torch.allclose(z_st.permute(0, 2, 3, 1).reshape(-1, 8), e[codes.flatten()])
    # backward: the gradient reaches z as if quantisation were the identity (on the normalised z)
    g = torch.randn_like(z)
    (z_st * g).sum().backward(retain_graph=True)
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=1) * g).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert q.embedding.weight.grad is None  # the reconstruction path does not move the codebook
    # loss value: codebook term + beta * commitment term, both ||z - e||^2 averaged
    assert torch.allclose(vq_loss, 1.25 * F.mse_loss(latents, e[codes.flatten()]))
    # the codebook loss moves exactly the codes that were used
    vq_loss.backward()
    moved = q.embedding.weight.grad.abs().sum(1) > 0
    assert torch.equal(moved.nonzero().flatten(), torch.unique(codes))


def test_gradient_reaches_the_encoder_through_the_full_model():
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, vq_loss, codes, latents = model(x)
    F.mse_loss(recon, x).backward()
    for p in (model.encoder.conv_in.weight, model.quant_conv.weight, model.decoder.conv_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_codebook_usage():
    assert codebook_usage(torch.randperm(256).reshape(16, 16), 256) == 1.0
    assert codebook_usage(torch.tensor([[0, 0, 1], [3, 3, 3]]), 8) == 3 / 8


def test_restart_replaces_exactly_the_dead_codes():
    q = tiny_model().quantize
    K = q.embedding.num_embeddings
    before = q.embedding.weight.detach().clone()
    hits = torch.ones(K, dtype=torch.long)
    dead = torch.tensor([3, 17, 100, 255])
    hits[dead] = 0
    latents = F.normalize(torch.randn(50, 8), dim=-1)
    n = restart_dead_codes(q, hits, latents, torch.Generator().manual_seed(0))
    after = q.embedding.weight.detach()
    assert n == 4
    changed = (after != before).any(1).nonzero().flatten()
    assert torch.equal(changed, dead)
    for i in dead:  # each restarted code is one of the recent latents
        assert (latents == after[i]).all(1).any()
    assert restart_dead_codes(q, torch.ones(K, dtype=torch.long), latents, torch.Generator()) == 0


def test_pixel_helpers_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = to_tensor(img)
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), img)
    assert to_tensor(img[0]).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("which", ["1B", "7B"])
def test_vq16_matches_the_official_checkpoint_layout(which):
    with open(SHAPES_JSON) as f:
        ref = json.load(f)
    prefix = "gen_vision_model."
    buffers = {k[len(prefix):] for k in ref[f"{which}_buffers"] if k.startswith(prefix)}
    official = {k[len(prefix):]: v for k, v in ref[which].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = VQModel(VQ_PRESETS["vq16"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # every official key and shape, minus the unused `quantize.codebook_used` buffer we leave out
    assert buffers == {"quantize.codebook_used"}
    assert ours == {k: v for k, v in official.items() if k not in buffers}
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(math.prod(v) for k, v in official.items() if k not in buffers) == 71_883_403


def test_matches_transformers_janus_vqvae():
    """Same weights in our VQModel and in transformers' JanusVQVAE: same latents, codes and pixels."""
    hf_janus = pytest.importorskip("transformers.models.janus.modeling_janus")
    from model import checkpoint_names
    from transformers import JanusVQVAEConfig
    cfg = VQConfig(image_size=32, ch=32, ch_mult=(1, 2), enc_blocks=1, dec_blocks=2, z_channels=32,
                   code_dim=8, codebook_size=64, norm_groups=32)
    torch.manual_seed(0)
    ours = VQModel(cfg).eval()
    with torch.no_grad():  # randomise norms and biases too, so a swapped key cannot hide
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
        # transformers' encode() skips the l2 normalisation; with unit codebook rows the nearest
        # code is the same either way, so give both models unit rows
        ours.quantize.embedding.weight.copy_(F.normalize(ours.quantize.embedding.weight, dim=-1))
    hf = hf_janus.JanusVQVAE(JanusVQVAEConfig(
        embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
        num_res_blocks=1, num_patches=16)).eval()

    def hf_name(k):  # our (= official) key -> transformers' key, through model.KEYS
        [(key, _)] = checkpoint_names("gen_vision_model." + k, None, "hf")
        return key[len("model.vqmodel."):]

    sd = {hf_name(k): v for k, v in ours.state_dict().items()}
    assert set(sd) == set(hf.state_dict())
    hf.load_state_dict(sd)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours.quant_conv(ours.encoder(x)), hf.quant_conv(hf.encoder(x)), atol=1e-5)
        codes = ours.encode(x)
        assert torch.equal(codes, hf.encode(x).image_tokens.reshape(2, -1))
        # pixels up to ~4.5 after a dozen convolutions: fp32 rounding reaches ~1.3e-5 (transformers 5.24)
        assert torch.allclose(ours.decode(codes), hf.decode(codes), atol=1e-4)


# -----------------------------------------------------------------------------
# Training entry point: resume, artefacts, wrong checkpoint


def train_tiny(out, steps, *extra):
    main(["--config", "tiny", "--out", str(out), "--steps", str(steps), "--eval-prompts", "7", *extra])


def test_resumed_training_ends_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    train_tiny(tmp_path / "a", 30)
    # the same run, killed at step 23: its last checkpoint is from step 20
    real_batch = tokenizer.train_batch

    def batch_or_crash(seed, step, *args):
        if step == 23:
            raise KeyboardInterrupt
        return real_batch(seed, step, *args)

    monkeypatch.setattr(tokenizer, "train_batch", batch_or_crash)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path / "b", 30, "--ckpt-every", "10")
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "vq_state.pt", weights_only=True)["step"] == 20
    assert not (tmp_path / "b" / "vq.pt").exists()
    # rerunning the same command resumes at step 20, crosses a dead-code restart (window 25), ends at 30
    train_tiny(tmp_path / "b", 30, "--ckpt-every", "10")
    a, b = (torch.load(tmp_path / d / "vq.pt", weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the artefacts a person and the other stages read
    ev = json.loads((tmp_path / "a" / "vq_eval.json").read_text())
    assert {"psnr", "usage", "agreement", "agreement_matching", "agreement_mismatching"} <= set(ev)
    assert ev["pairs"] == 14
    assert (tmp_path / "a" / "vq_recon.png").exists()
    vq = load_vq(tmp_path / "a" / "vq.pt")
    assert vq.cfg == VQ_PRESETS["tiny"] and not vq.training


def test_checkpoint_of_another_run_is_refused(tmp_path):
    train_tiny(tmp_path, 2)
    for argv, expect in ((["--config", "toy", "--steps", "2"], "image_size=32 (now 64)"),
                         (["--config", "tiny", "--steps", "3"], "steps=2 (now 3)")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path)])
        msg = str(e.value)
        assert msg.startswith("error:") and expect in msg and "\n" not in msg


# -----------------------------------------------------------------------------
# Text tokenizer

TOK = TextTokenizer(shapes.WORDS)


def project_texts(n=300):
    """Every kind of string the method writes, filled with sampled prompts, reasons and edits."""
    rng = random.Random(0)
    for i in range(n):
        p = shapes.sample_prompt(rng, shapes.CATEGORIES[i % len(shapes.CATEGORIES)])
        reason = shapes.check(shapes.render(shapes.sample_scene(rng, 32, p, match=i % 2 == 0)), p).reason
        edit = shapes.sample_edit(rng, 32)[1].text
        yield p.text
        yield reason
        yield f"<|User|>: {p.text}\n\n<|Assistant|>:<begin_of_image>"
        yield f"<end_of_image>\nLet me think Does this image match the prompt... {reason}<eos>"
        yield "\nNext, I will draw a new image<begin_of_image>"
        yield f"<|User|>: <begin_of_image><end_of_image>{edit} Please generate an image.\n\n<|Assistant|>:<begin_of_image>"


def test_text_round_trip_over_project_strings():
    n = 0
    for text in project_texts():
        ids = TOK.encode(text)
        assert TOK.decode(ids) == text
        n += 1
    assert n == 1800


def test_text_tokenizer_vocabulary_and_special_ids():
    assert len(TOK) <= 256  # the model presets' vocabulary size
    specials = [TOK.pad, TOK.bos, TOK.eos, TOK.user, TOK.assistant, TOK.boi, TOK.eoi, TOK.img, TOK.newline,
                TOK.yes, TOK.no]
    assert len(set(specials)) == len(specials)
    assert [TOK.vocab[i] for i in (TOK.boi, TOK.eoi, TOK.img, TOK.yes, TOK.no)] == [
        "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "Yes", "No"]
    assert TOK.encode("No, the circle is green, not red.") == [
        TOK.no, TOK.ids[","], TOK.ids["the"], TOK.ids["circle"], TOK.ids["is"], TOK.ids["green"],
        TOK.ids[","], TOK.ids["not"], TOK.ids["red"], TOK.ids["."]]
    assert TOK.encode("prompt...") == [TOK.ids["prompt"], TOK.ids["..."]]
    assert TOK.encode("a red circle", bos=True, eos=True) == [TOK.bos, TOK.ids["a"], TOK.ids["red"],
                                                              TOK.ids["circle"], TOK.eos]
    assert TextTokenizer(list(reversed(shapes.WORDS))).vocab == TOK.vocab  # deterministic order


def test_unknown_word_and_other_spacing_are_errors():
    with pytest.raises(ValueError, match="'hexagon'"):
        TOK.encode("a red hexagon")
    with pytest.raises(ValueError, match="'Red'"):  # case-sensitive
        TOK.encode("a Red circle")
    with pytest.raises(ValueError, match="canonical spacing"):
        TOK.encode("a  red circle")
