"""
Loading real model folders (model.load_pretrained) and the DeepSeek text tokenizer
(tokenizer.BPETokenizer), against transformers and tokenizers on folders the tests write themselves:
a random small transformers Janus saved with save_pretrained, an official-layout folder in shards,
a byte-level BPE tokenizer.json trained here. Nothing is downloaded.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pretrained.py
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from model import PRESETS, JanusConfig, Janus, hf_janus, load_pretrained, pretrained_configs, to_official
from tokenizer import VQConfig, VQModel

# a VQ of the tiny model's grid (32 px -> 4x4 codes) in transformers' shape (GroupNorm 32, one more
# decoder block per level than encoder blocks)
VQ = VQConfig(image_size=32, ch=32, ch_mult=(1, 1, 2, 2), enc_blocks=1, dec_blocks=2, z_channels=32, code_dim=8,
              codebook_size=256, norm_groups=32)


def tiny(**changes):
    # without the toy's image position table: the official and HF layouts have none
    return JanusConfig(**{**PRESETS["tiny"], "image_pos": False, **changes})


@torch.no_grad()
def randomized(module, seed=0):
    """Weights of O(1) effect everywhere (norm gains and biases too), so that a wrong mapping moves
    the outputs by far more than the tolerances; VQ codebook rows of unit norm (see load_pretrained)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and name.endswith("weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel() if "embed" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        if name.endswith("quantize.embedding.weight"):
            p.copy_(F.normalize(p, dim=-1))
    return module.eval()


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


# -----------------------------------------------------------------------------
# a transformers folder (save_pretrained): same logits, same pixels


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_transformers_folder_matches_transformers(tmp_path, tie, n_kv_head):
    cfg = tiny(n_kv_head=n_kv_head, tie_embeddings=tie)
    hf = randomized(hf_janus(cfg, VQ))
    hf.config.image_token_id = 7  # a placeholder id inside the tiny vocabulary, for HF's own splice
    hf.save_pretrained(tmp_path)
    model, vq = load_pretrained(tmp_path)
    assert model.cfg == cfg and vq.cfg == VQ
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tie  # a tied save holds the table once

    g = torch.Generator().manual_seed(1)
    n = cfg.image_tokens
    idx = torch.randint(8, cfg.vocab_size, (2, 2 * n + 12), generator=g)
    pixels = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    codes = torch.randint(0, cfg.image_vocab_size, (2, n), generator=g)
    und = torch.zeros_like(idx, dtype=torch.bool)
    und[:, 4:4 + n] = True
    gen = torch.zeros_like(idx, dtype=torch.bool)
    gen[:, -4 - n:-4] = True
    with torch.no_grad():
        # text only, through transformers' own forward
        text = hf(input_ids=idx[:, :10]).logits
        assert text.abs().max() > 1 and maxdiff(model.text_logits(model(model.embed(idx[:, :10]))), text) <= 1e-4
        # understanding: an image at placeholder positions, transformers' own splice and forward
        with_image = torch.where(und, 7, idx)[:, :n + 10]
        theirs = hf(input_ids=with_image, pixel_values=pixels).logits
        ours = model.text_logits(model(model.embed(with_image, und_pixels=pixels, und_mask=und[:, :n + 10])))
        assert maxdiff(ours, theirs) <= 1e-4
        # an image as VQ codes too, and the image head over the whole mixed sequence
        m = hf.model
        x = m.language_model.embed_tokens(idx)
        x[und] = m.get_image_features(pixels).pooler_output.reshape(-1, cfg.n_embd)
        x[gen] = hf.prepare_embeddings_for_image_generation(codes.reshape(-1))
        h_theirs = m.language_model(inputs_embeds=x).last_hidden_state
        h = model(model.embed(idx, pixels, und, codes, gen))
        assert maxdiff(model.image_logits(h), m.generation_head(h_theirs)) <= 1e-4
        assert maxdiff(model.text_logits(h), hf.lm_head(h_theirs)) <= 1e-4
        # the VQ tokenizer: same codes (unit codebook rows), same pixels
        assert torch.equal(vq.encode(pixels), m.vqmodel.encode(pixels).image_tokens.reshape(2, -1))
        assert maxdiff(vq.decode(codes), m.vqmodel.decode(codes)) <= 1e-4


def test_bf16_on_request(tmp_path):
    hf_janus(tiny()).save_pretrained(tmp_path)
    full, _ = load_pretrained(tmp_path)
    half, vq = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and {p.dtype for p in vq.parameters()} == {torch.float32}
    for (k, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), k


def test_missing_or_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_janus(tiny()).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in sd.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"missing 1 keys: {key}"):
        load_pretrained(tmp_path)
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected 1 keys: model.extra.weight"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        load_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# the official DeepSeek layout: config.json as released, weights in .bin shards with an index


def official_config(cfg, vq=None):
    """config.json as the official Janus-Pro folders have it; with vq, our small VQ and ViT spelt
    out in params (the official code always builds SigLIP-L and VQ-16)."""
    d = cfg.n_embd
    vision = {"image_size": cfg.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same", "select_layer": -1}
    if vq is not None:
        vision.update(model_name="small", patch_size=cfg.vit_patch, width=cfg.vit_width, layers=cfg.vit_layers,
                      heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp / cfg.vit_width)
    mlp = lambda depth, d_in: {"cls": "MlpProjector", "params": {"depth": depth, "input_dim": d_in, "n_embed": d, "projector_type": "mlp_gelu"}}
    return {"model_type": "multi_modality", "architectures": ["MultiModalityCausalLM"],
            "aligner_config": mlp(cfg.aligner_depth, cfg.vit_width), "gen_aligner_config": mlp(cfg.gen_aligner_depth, cfg.image_code_dim),
            "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": cfg.gen_head_width or d,
                                                                 "image_token_size": cfg.image_vocab_size, "n_embed": d}},
            "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": cfg.image_vocab_size, "n_embed": cfg.image_code_dim,
                                                             **({} if vq is None else {k: getattr(vq, k) for k in ("ch", "ch_mult", "enc_blocks", "dec_blocks", "z_channels", "norm_groups")})}},
            "language_config": {"hidden_size": d, "intermediate_size": cfg.ffn_hidden, "max_position_embeddings": 16384,
                                "model_type": "llama", "num_attention_heads": cfg.n_head, "num_hidden_layers": cfg.n_layer,
                                "num_key_value_heads": cfg.n_kv_head, "torch_dtype": "bfloat16", "vocab_size": cfg.vocab_size},
            "vision_config": {"cls": "CLIPVisionTower", "params": vision}}


@pytest.mark.parametrize("name", ["janus-pro-1b", "janus-pro-7b"])
def test_official_config_gives_the_preset(tmp_path, name):
    cfg = JanusConfig(**PRESETS[name])
    (tmp_path / "config.json").write_text(json.dumps(official_config(cfg)))
    got, vq, layout = pretrained_configs(tmp_path)
    assert layout == "official" and got == JanusConfig(**{**PRESETS[name], "max_seq_len": 16384})
    assert vq.num_tokens == 576 and (vq.ch, vq.ch_mult, vq.codebook_size) == (128, (1, 1, 2, 2, 4), 16384)


def test_official_folder_in_shards_loads_exactly(tmp_path):
    # a deeper aligner and a narrower gen head: what the official config can say and the presets don't use
    cfg = tiny(n_kv_head=2, aligner_depth=3, gen_head_width=48)
    src, src_vq = randomized(Janus(cfg), seed=3), randomized(VQModel(VQ), seed=4)
    sd = {**to_official(src), **{"gen_vision_model." + k: v for k, v in src_vq.state_dict().items()}}
    sd["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, cfg.vit_width)  # never run: dropped
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(VQ.codebook_size)  # unused buffer: dropped
    keys = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for file, ks in shards.items():
        torch.save({k: sd[k].to(torch.bfloat16) for k in ks}, tmp_path / file)  # released in bf16
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(official_config(cfg, VQ)))
    model, vq = load_pretrained(tmp_path)
    assert model.cfg == tiny(n_kv_head=2, aligner_depth=3, gen_head_width=48, max_seq_len=16384) and vq.cfg == VQ
    for ours, theirs in ((model, src), (vq, src_vq)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v.to(torch.bfloat16).float()), k
    # a shard missing from the folder is an error, not a model with uninitialised weights
    os.remove(tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises((ValueError, FileNotFoundError)):
        load_pretrained(tmp_path)


# -----------------------------------------------------------------------------
# the DeepSeek text tokenizer against `tokenizers`, on a byte-level BPE trained here with
# DeepSeek's pre-tokenizer and special tokens

# DeepSeek-LLM's letter class (six code points written as escapes: copied text tends to get them
# NFC-normalised into other characters, which breaks the ranges)
LETTERS = ("[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7d"
           "ᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗ"
           "Ａ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+")
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
            "<begin_of_image>", "<end_of_image>"]
CORPUS = ["<|User|>: a red circle to the left of two squares\n\n<|Assistant|>:",
          "Let me think Does this image match the prompt... Yes, it does. No, the circle is green, not red.",
          "Next, I will draw a new image. 12 apples cost 3.50 €; naïve café déjà vu — Ωμέγα λέξη.",
          "Привет, мир! 你好，世界。 こんにちは 안녕하세요 🙂👍 tabs\tand   spaces  ", "Yes No Yes No yes no"] * 20


def write_tokenizer_json(path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    split = lambda rx: pre_tokenizers.Split(Regex(rx), "isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        split(r"[\r\n]"), split(r"\s?" + LETTERS), split(r"\s?[!-/:-~！-／：-～‘-‟　-。]+"), split(r"\s+$"),
        split("[一-龥ࠀ-一가-퟿]+"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # the role markers as plain (normalised, not special) added tokens: the second matching pass
    tok.add_tokens([AddedToken("<|User|>"), AddedToken("<|Assistant|>")])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], 0)])
    tok.save(str(path))
    return tok


def random_strings(n, seed=0):
    """Strings mixing scripts, digits of several kinds, spaces, newlines, control characters,
    emoji and the special tokens (also glued to words and to each other)."""
    import random
    rng = random.Random(seed)
    alphabet = list("abcXYZ  \n\t\r.,!?:;'\"-_()[]{}<>|/\\0123456789") + list("éèüßçøΩμλПрю你好世界こん안녕🙂👍€½Ⅻ٣３　\x1c\x85\xa0\u2028")
    words = ["the", " circle", "Yes", "No", "image", "  ", "\n\n", "12345", "café", "Привет", "<|User|>", "<|Assistant|>"] + SPECIALS
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.4 else "".join(rng.choices(alphabet, k=rng.randint(1, 6)))
                 for _ in range(rng.randint(1, 8))]
        out.append("".join(parts))
    return out


def test_bpe_equals_tokenizers(tmp_path):
    from tokenizer import BPETokenizer
    theirs = write_tokenizer_json(tmp_path / "tokenizer.json")
    ours = BPETokenizer(tmp_path / "tokenizer.json")
    assert len(ours) == theirs.get_vocab_size() == 422
    assert (ours.bos, ours.eos, ours.pad, ours.img) == (0, 1, 2, 3) and ours.decode([ours.yes, ours.no]) == "YesNo"
    strings = random_strings(3000) + CORPUS[:5] + ["", " ", "\n", "x" * 50, "2024-01-02"]
    for s in strings:
        want = theirs.encode(s, add_special_tokens=False).ids
        assert ours.encode(s) == want, repr(s)
        assert ours.decode(want) == theirs.decode(want, skip_special_tokens=False) == s, repr(s)
    # BOS as the post-processor adds it, EOS on request
    s = strings[0]
    assert ours.encode(s, bos=True) == theirs.encode(s).ids and ours.encode(s, eos=True)[-1] == ours.eos


def test_bpe_refuses_what_it_does_not_implement(tmp_path):
    from tokenizer import BPETokenizer
    write_tokenizer_json(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][-1]["use_regex"] = True  # GPT-2's regex inside ByteLevel
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        BPETokenizer(tmp_path / "tokenizer.json")


# -----------------------------------------------------------------------------
# sample.py and judge.py on a model folder: a transformers save plus the tokenizer.json


def test_prompt_layout_is_the_official_template_encoded_whole(tmp_path):
    import sample
    from tokenizer import BPETokenizer
    theirs = write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = BPETokenizer(tmp_path / "tokenizer.json")
    caption = "a red circle to the left of 2 squares"
    seq = sample.prompt_seq(tok, caption)
    assert seq.ids == theirs.encode(f"<|User|>: {caption}\n\n<|Assistant|>:<begin_of_image>").ids  # BOS first
    assert tok.decode([i for i, sp in zip(seq.ids, seq.span) if sp == sample.CAPTION]) == " " + caption


def test_understanding_layout_is_the_official_template(tmp_path):
    """janus_pro_facts.md: `{system}\\n\\n<|User|>: <image_placeholder>\\n{question}\\n\\n<|Assistant|>:`, the
    placeholder becoming <begin_of_image> + the image's positions + <end_of_image>: the ids around
    the image are those of the official string cut at the image."""
    import numpy as np

    import sample
    from tokenizer import BPETokenizer
    theirs = write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = BPETokenizer(tmp_path / "tokenizer.json")
    q, n = "Is the circle red?", 16
    seq = sample.vqa_seq(tok, np.zeros((32, 32, 3), np.uint8), q, n)
    text = f"{sample.SYSTEM}\n\n<|User|>: <begin_of_image><image_placeholder><end_of_image>\n{q}\n\n<|Assistant|>:"
    before, after = text.split("<image_placeholder>")
    want = theirs.encode(before).ids + [None] * n + theirs.encode(after, add_special_tokens=False).ids
    assert [i if k == sample.TEXT else None for i, k in zip(seq.ids, seq.kind)] == want


def test_sample_and_judge_run_on_a_model_folder(tmp_path, capsys):
    import judge
    import sample
    from PIL import Image
    folder = tmp_path / "model"
    tok = write_tokenizer_json(tmp_path / "tokenizer.json")
    hf_janus(tiny(vocab_size=tok.get_vocab_size()), VQ).save_pretrained(folder)
    os.replace(tmp_path / "tokenizer.json", folder / "tokenizer.json")
    sample.main(["--ckpt", str(folder), "--prompt", "a photo of a cat, 2 of them", "--n", "2", "--rounds", "2",
                 "--out", str(tmp_path / "out")])
    chains = [json.loads(line) for line in open(tmp_path / "out" / "chains.jsonl")]
    assert len(chains) == 2 and all(1 <= len(c["files"]) <= 2 for c in chains)
    assert Image.open(tmp_path / "out" / chains[0]["files"][0]).size == (32, 32)
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "wide.png")  # not square: padded with grey
    capsys.readouterr()
    judge.main(["--ckpt", str(folder), "--image", str(tmp_path / "wide.png"), "--prompt", "a red image"])
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] in ("yes", "no") and 0 <= out["p_yes"] <= 1 and out["reason"].startswith(("Yes", "No"))


def test_sft_and_rl_train_a_model_folder(tmp_path):
    """sft.py --stage sft --init FOLDER and rl.py --init FOLDER: the SFT tasks and GRPO on ShapeWorld
    prompts from a released-layout model (its samples as the SFT pool, its BPE tokenizer, chat
    template and VQ); sft.pt and rl.pt carry the tokenizer, so rl.py (as the judge) and sample.py
    read them as they read the folder. (Under torchrun the same paths run in tests/test_rl.py.)"""
    import rl
    import sample
    import sft
    from common import load_checkpoint
    from tokenizer import BPETokenizer
    folder = tmp_path / "model"
    tok = write_tokenizer_json(tmp_path / "tokenizer.json")
    randomized(hf_janus(tiny(vocab_size=tok.get_vocab_size()), VQ)).save_pretrained(folder)
    os.replace(tmp_path / "tokenizer.json", folder / "tokenizer.json")
    start = load_pretrained(str(folder))[0].state_dict()
    moved = lambda sd: any(not torch.allclose(sd[k], v, atol=1e-6) for k, v in start.items())
    out = tmp_path / "run"
    sft.main(["--stage", "sft", "--config", "tiny", "--init", str(folder), "--out", str(out), "--steps", "3",
              "--batch-size", "4", "--sft-prompts", "6", "--samples-per-prompt", "2", "--eval-every", "0", "--no-final-eval"])
    assert {t for _, t, _ in load_checkpoint(str(out / "sft_state.pt"))["log"]} <= {"task1", "task2", "task3"}
    model, _, tok2, _ = sample.load_janus(str(out / "sft.pt"))
    assert isinstance(tok2, BPETokenizer) and tok2.encode("a red circle") == BPETokenizer(str(folder / "tokenizer.json")).encode("a red circle")
    assert moved(model.state_dict())
    # GRPO from the folder, rewarded by the fine-tuned model's P(yes) (a random model draws no
    # shapes: the checker's reward would be 0 everywhere)
    rl.main(["--config", "tiny", "--init", str(folder), "--reward", "judge", "--judge-ckpt", str(out / "sft.pt"),
             "--out", str(tmp_path / "rl"), "--steps", "1", "--prompts", "2", "--group", "4", "--lr", "1e-3",
             "--no-final-eval", "--dtype", "fp32"])
    assert moved(load_checkpoint(str(tmp_path / "rl" / "rl.pt"))["model"])
    sample.main(["--ckpt", str(tmp_path / "rl" / "rl.pt"), "--prompt", "a red circle", "--n", "1", "--rounds", "2",
                 "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "chains.jsonl").exists()
