"""The step-aware preference model: identity init, the loss by hand, data streaming, exact resume."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from spo_studio.backend.config import load_config
from spo_studio.backend.preference.data import PickAPicStream, write_pickapic
from spo_studio.backend.preference.loss import distillation_targets, pair_accuracy, preference_loss
from spo_studio.backend.preference.spm import StepAwarePreferenceModel, pocket_clip_config
from spo_studio.backend.preference.train import SPMTrainConfig, train_spm
from spo_studio.backend.word_tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def small_spm():
    tok = build_word_tokenizer(["a", "red", "blue", "circle", "square"], model_max_length=16)
    torch.manual_seed(0)
    from transformers import CLIPModel

    clip = CLIPModel(pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 16))
    return StepAwarePreferenceModel(clip, tok).eval()


def test_identity_init_equals_base_clip_for_any_t(small_spm):
    spm = small_spm
    images = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    ids = spm.tokenize(["a red circle", "a blue square", "a red square", "a blue circle"])
    with torch.no_grad():
        out = spm.clip(input_ids=ids, pixel_values=spm.preprocess(images))
        base = out.logits_per_image.diagonal()
        plain = spm(images, ids, None)
        for t in (0, 1, 250, 500, 999):
            s = spm(images, ids, torch.full((4,), t))
            assert torch.equal(s, plain), f"t={t}: the untrained SPM must equal its base scorer exactly"
    assert torch.allclose(plain, base, atol=1e-5)
    # and training the modulation does change the score with t
    with torch.no_grad():
        spm.time.layers[0].weight.normal_(0, 0.1)
        spm.time.mlp[0].weight.normal_(0, 0.1)
        a = spm(images, ids, torch.full((4,), 100))
        b = spm(images, ids, torch.full((4,), 900))
        spm.time.reset_identity()
    assert not torch.allclose(a, b)


def test_loss_equals_hand_computation_with_ties():
    s0 = torch.tensor([2.0, 0.5, 1.0])
    s1 = torch.tensor([1.0, 1.5, 3.0])
    l0 = torch.tensor([1.0, 0.0, 0.5])
    l1 = torch.tensor([0.0, 1.0, 0.5])

    def log_softmax_pair(a, b):
        m = max(a, b)
        z = math.log(math.exp(a - m) + math.exp(b - m)) + m
        return a - z, b - z

    per = []
    for a, b, x, y in zip(s0.tolist(), s1.tolist(), l0.tolist(), l1.tolist()):
        la, lb = log_softmax_pair(a, b)
        tie = math.log(0.5) if x == y else 0.0
        per.append(-(x * la + y * lb) + tie)
    hand = sum(per) / 3
    # pair 1: −log σ(1) = 0.31326; pair 2: −log σ(1) again; pair 3 (tie): −½(log p0 + log p1) + log ½
    assert per[0] == pytest.approx(0.3132617, abs=1e-6)
    assert per[2] == pytest.approx(
        -0.5 * (math.log(1 / (1 + math.e**2)) + math.log(1 / (1 + math.e**-2))) + math.log(0.5)
    )
    assert preference_loss(s0, s1, l0, l1).item() == pytest.approx(hand, abs=1e-6)
    # a tie between equal scores has loss exactly 0
    assert preference_loss(
        torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.5])
    ).item() == pytest.approx(0.0, abs=1e-7)
    assert pair_accuracy(s0, s1, l0, l1).item() == pytest.approx(1.0)  # the tie is excluded



def test_soft_targets_and_distillation_targets_by_hand():
    # soft target q = (0.8, 0.2) on scores (2, 1): loss = KL(q ‖ softmax(s)) = Σ q·log q − Σ q·log p
    p0 = 1 / (1 + math.exp(-1.0))
    hand = 0.8 * math.log(0.8) + 0.2 * math.log(0.2) - 0.8 * math.log(p0) - 0.2 * math.log(1 - p0)
    assert hand == pytest.approx(0.0128593, abs=1e-6)
    got = preference_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([0.2]))
    assert got.item() == pytest.approx(hand, abs=1e-6)
    # its minimum is 0, where the scorer's probability equals the target
    logit = math.log(0.8 / 0.2)
    at_min = preference_loss(torch.tensor([logit]), torch.tensor([0.0]), torch.tensor([0.8]), torch.tensor([0.2]))
    assert at_min.item() == pytest.approx(0.0, abs=1e-6)
    # targets: λ = 0.25, crowd (1, 0) / tie, teacher scores (1, 3) → p_teacher = (σ(−2), σ(2))
    l0, l1 = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    q0, q1 = distillation_targets(l0, l1, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), 0.25)
    sig = 1 / (1 + math.exp(2.0))  # 0.1192029
    assert q0.tolist() == pytest.approx([0.75 + 0.25 * sig, 0.5], abs=1e-6)
    assert q1.tolist() == pytest.approx([0.25 * (1 - sig), 0.5], abs=1e-6)
    same = distillation_targets(l0, l1, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), 0.0)
    assert torch.equal(same[0], l0) and torch.equal(same[1], l1)
    with pytest.raises(ValueError, match=r"distillation weight must be in \[0, 1\]; got 1.5"):
        distillation_targets(l0, l1, l0, l1, 1.5)

def _png(color, size=32):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pair_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c0, c1 = rng.integers(0, 255, 3).tolist(), rng.integers(0, 255, 3).tolist()
        label = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)][i % 3]
        rows.append({"caption": ["a red circle", "a blue square"][i % 2], "jpg_0": _png(c0), "jpg_1": _png(c1),
                     "label_0": label[0], "label_1": label[1]})
    return rows


def test_stream_skips_and_counts_bad_rows(tmp_path):
    rows = _pair_rows(6)
    rows[1]["jpg_0"] = b"not an image"
    rows[3]["caption"] = ""
    rows[4]["label_0"] = None
    path = tmp_path / "pairs.parquet"
    write_pickapic(path, rows)
    stream = PickAPicStream(path, batch_rows=2)
    pairs = list(stream)
    assert len(pairs) == 3
    assert stream.stats == {"ok": 3, "undecodable_image": 1, "missing_caption": 1, "bad_label": 1}
    assert pairs[-1].label0 == 0.5 and pairs[-1].image0.shape == (32, 32, 3)
    # resume position: skipping 2 good pairs gives the 3rd
    assert list(PickAPicStream(path).iter_epoch(0, start=2))[0].caption == pairs[2].caption
    bad = tmp_path / "x.parquet"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="x.parquet: not a readable parquet"):
        PickAPicStream(bad)


@pytest.mark.parametrize("schedule", [[], ["lr_schedule=cosine", "hflip=true", "rot90=true"]],
                         ids=["constant", "cosine-flip-rot"])
def test_resumed_training_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch, schedule):
    from spo_studio.backend.preference import train as train_module

    data = tmp_path / "pairs.parquet"
    write_pickapic(data, _pair_rows(40))
    common = [f"base_model={tiny_dirs['sd15']}", "init=scratch:pocket", f"train_data={data}", "lr=1e-3",
              "warmup_steps=2", "batch_size=4", "log_every=1", "shuffle_buffer=8", "t_max=999", "max_steps=12",
              "checkpoint_every=7", *schedule]
    train_spm(load_config(SPMTrainConfig, None, common + [f"output_dir={tmp_path / 'full'}"]))

    save = train_module.save_checkpoint

    def save_then_die(run_dir, step, state):  # the process is killed right after the step-7 checkpoint
        save(run_dir, step, state)
        raise KeyboardInterrupt(f"killed after step {step}")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    cut = load_config(SPMTrainConfig, None, common + [f"output_dir={tmp_path / 'cut'}"])
    with pytest.raises(KeyboardInterrupt, match="after step 7"):  # mid-epoch 1: 10 batches per epoch
        train_spm(cut)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    train_spm(cut)
    a = StepAwarePreferenceModel.load(tmp_path / "full" / "spm").state_dict()
    b = StepAwarePreferenceModel.load(tmp_path / "cut" / "spm").state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 12


def test_resume_refuses_a_changed_recipe_and_allows_a_longer_run(tiny_dirs, tmp_path):
    data = tmp_path / "pairs.parquet"
    write_pickapic(data, _pair_rows(12))
    common = [f"base_model={tiny_dirs['sd15']}", "init=scratch:pocket", f"train_data={data}", "batch_size=4",
              "shuffle_buffer=8", "checkpoint_every=2", f"output_dir={tmp_path / 'run'}"]
    train_spm(load_config(SPMTrainConfig, None, common + ["max_steps=2"]))
    other = tmp_path / "other.parquet"
    write_pickapic(other, _pair_rows(12, seed=3))
    with pytest.raises(ValueError, match=r"config.yaml: the checkpoints .* another config \(train_data: .*other"):
        train_spm(load_config(SPMTrainConfig, None, common + ["max_steps=4", f"train_data={other}"]))
    with pytest.raises(ValueError, match=r"lr: 3e-06 → 0.001"):
        train_spm(load_config(SPMTrainConfig, None, common + ["max_steps=4", "lr=1e-3"]))
    train_spm(load_config(SPMTrainConfig, None, common + ["max_steps=4"]))  # a longer run resumes
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [2]
    train_spm(load_config(SPMTrainConfig, None, common + ["max_steps=2", "lr=1e-3", "resume=false"]))  # start over


def test_cosine_schedule_and_mirroring():
    from spo_studio.backend.preference.train import _lr_factor, mirror_pairs

    # warm-up 4 steps of 100: (s+1)/4, then cos from 1 to 0 at step 100
    assert _lr_factor(0, 4, "cosine", 100) == pytest.approx(0.25 * 0.5 * (1 + math.cos(0)))
    assert _lr_factor(50, 4, "cosine", 100) == pytest.approx(0.5)
    assert _lr_factor(75, 4, "cosine", 100) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))
    assert _lr_factor(100, 4, "cosine", 100) == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(75, 4, "linear", 100) == pytest.approx(0.25)
    assert _lr_factor(1, 4, "linear", 100) == pytest.approx(0.5 * 0.99)
    assert _lr_factor(75, 4, "constant", 100) == 1.0
    images = torch.arange(6 * 3 * 2 * 4, dtype=torch.float32).view(6, 3, 2, 4)  # 3 pairs: rows i and 3+i
    out = mirror_pairs(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(6)]
    assert [torch.equal(out[i], images[i]) for i in range(6)] == [not f for f in flipped]
    assert flipped[:3] == flipped[3:] and any(flipped) and not all(flipped)  # a pair's two images flip together
    with pytest.raises(ValueError, match="lr_schedule must be linear, cosine or constant"):
        load_config(SPMTrainConfig, None, ["lr_schedule=step"]).validate()


def test_rotate_pairs_turns_both_images_of_a_pair_alike():
    from spo_studio.backend.preference.train import rotate_pairs

    images = torch.arange(8 * 3 * 3 * 3, dtype=torch.float32).view(8, 3, 3, 3)  # 4 pairs: rows i and 4+i
    out = rotate_pairs(images, torch.Generator().manual_seed(1))
    turns = []
    for i in range(8):
        k = [r for r in range(4) if torch.equal(out[i], torch.rot90(images[i], r, dims=(-2, -1)))]
        assert len(k) == 1, f"row {i} is not a 90° rotation of its input"
        turns.append(k[0])
    assert turns[:4] == turns[4:]  # a pair's two images turn together
    assert len(set(turns[:4])) > 1  # and pairs differ (seeded: generator 1 gives more than one k on 4 pairs)


def test_eval_spm_and_score_commands(tiny_dirs, tiny_spm, tmp_path):
    """`spo eval-spm` writes accuracy per timestep bucket (SPM and base scorer on the same inputs) as
    JSON + PNG; `spo score` writes per-step scores, a plot and an x̂0 strip."""
    import json

    from PIL import Image
    from spo_studio.backend.cli import main

    data = tmp_path / "held_out.parquet"
    write_pickapic(data, _pair_rows(9))
    train = tmp_path / "train.parquet"  # its only caption is "a red circle": the blue-square pairs are unseen
    write_pickapic(train, [r for r in _pair_rows(4, seed=1) if r["caption"] == "a red circle"])
    out = tmp_path / "eval"
    assert main(["eval-spm", "--spm", str(tiny_spm), "--base-scorer", str(tiny_spm), "--model", str(tiny_dirs["sd15"]),
                 "--data", str(data), "--train-data", str(train), "--max-pairs", "9", "--out", str(out)]) == 0
    result = json.loads((out / "spm_eval.json").read_text())
    assert list(result["buckets"]) == ["0", "250", "500", "750", "950"]
    for row in result["buckets"].values():
        assert row["spm"]["n"] == 6 == row["base"]["n"]  # 9 rows, 3 ties excluded
        assert 0 <= row["spm"]["accuracy"] <= 1
        assert row["unseen_prompts"]["spm"]["n"] == 3 == row["unseen_prompts"]["base"]["n"]  # rows 1, 3, 7
    # the clean row: the images as they are (no VAE round trip), SPM at t = 0, base without t
    from spo_studio.backend.models import load_model
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.preference.train import images_tensor

    pairs = [p for p in PickAPicStream(data).iter_epoch(0) if p.label0 != p.label1]
    images = images_tensor([p.image0 for p in pairs] + [p.image1 for p in pairs], 32)
    prompts = [p.caption for p in pairs] * 2
    scorer = Scorer.from_path(tiny_spm, load_model(tiny_dirs["sd15"]))
    for key, t in (("spm", 0), ("base", None)):
        s0, s1 = scorer.score_images(images, prompts, t).chunk(2)
        verdicts = [bool(a > b) == (p.label0 > p.label1) for a, b, p in zip(s0, s1, pairs)]
        expected = sum(verdicts) / len(pairs)
        se = pytest.approx(math.sqrt(expected * (1 - expected) / 6))
        assert result["clean"][key] == {"accuracy": expected, "stderr": se, "n": 6}
        unseen = [v for v, p in zip(verdicts, pairs) if p.caption == "a blue square"]
        assert result["clean"]["unseen_prompts"][key]["accuracy"] == sum(unseen) / 3
    assert (out / "spm_eval.png").exists()
    # --against: the same SPM against itself differs by nothing, on no pair
    assert main(["eval-spm", "--spm", str(tiny_spm), "--base-scorer", str(tiny_spm), "--model", str(tiny_dirs["sd15"]),
                 "--data", str(data), "--max-pairs", "9", "--against", str(tiny_spm), "--out", str(out)]) == 0
    itself = json.loads((out / "spm_eval.json").read_text())
    for row in [itself["clean"], *itself["buckets"].values()]:
        assert row["against"] == row["spm"]
        assert (row["difference"]["difference"], row["difference"]["a_only"], row["difference"]["b_only"]) == (0, 0, 0)

    score_dir = tmp_path / "score"
    assert main(["score", "--model", str(tiny_dirs["sd15"]), "--spm", str(tiny_spm), "--prompt", "a red circle",
                 "--steps", "5", "--out", str(score_dir)]) == 0
    meta = json.loads((score_dir / "scores.json").read_text())
    assert len(meta["scores"]) == 5 and meta["timesteps"][0] > meta["timesteps"][-1]
    with Image.open(score_dir / "x0_strip.png") as strip:
        assert strip.size[0] == 5 * strip.size[1]
    assert (score_dir / "scores.png").exists()


def test_shrink_latents_area_averages_to_the_spm_size_and_never_enlarges():
    from spo_studio.backend.preference.scoring import shrink_latents

    x = torch.arange(2 * 4 * 16 * 24, dtype=torch.float32).view(2, 4, 16, 24)
    out = shrink_latents(x, image_size=48, vae_scale_factor=4)  # 24 latents → 12 → 48 px on the long side
    assert out.shape == (2, 4, 8, 12)
    assert torch.allclose(out[1, 2, 3, 5], x[1, 2, 6:8, 10:12].mean())
    assert shrink_latents(x, image_size=224, vae_scale_factor=8) is x  # 24·8 = 192 px < 224: unchanged


def test_validation_split_partitions_the_captions_stably(tiny_dirs, tiny_spm, tmp_path):
    import hashlib

    from spo_studio.backend.preference.data import in_validation
    from spo_studio.backend.preference.evaluate import load_pairs

    rows = _pair_rows(60)
    for i, row in enumerate(rows):
        row["caption"] = f"caption {i % 20}"
    path = tmp_path / "pairs.parquet"
    write_pickapic(path, rows)
    # the rule by hand: SHA-1's first 8 bytes as a fraction of 2^64, below the fraction
    digest = int.from_bytes(hashlib.sha1(b"caption 3").digest()[:8], "big")
    assert in_validation("caption 3", 0.3) == (digest / 2**64 < 0.3)
    val_captions = {f"caption {i}" for i in range(20) if in_validation(f"caption {i}", 0.3)}
    assert 0 < len(val_captions) < 20
    train = list(PickAPicStream(path, split="train", val_fraction=0.3))
    val = list(PickAPicStream(path, split="val", val_fraction=0.3))
    assert {p.caption for p in val} == val_captions
    assert not {p.caption for p in train} & val_captions
    assert len(train) + len(val) == 60
    # resume positions count the split's own pairs
    assert list(PickAPicStream(path, split="train", val_fraction=0.3).iter_epoch(0, start=5))[0].caption == \
        train[5].caption
    decided = [p for p in val if p.label0 != p.label1]
    assert [p.caption for p in load_pairs(path, val_fraction=0.3)] == [p.caption for p in decided]
    # `spo eval-spm --val-fraction` evaluates exactly the validation split's decided pairs
    from spo_studio.backend.cli import main

    out = tmp_path / "eval"
    assert main(["eval-spm", "--spm", str(tiny_spm), "--base-scorer", str(tiny_spm), "--model", str(tiny_dirs["sd15"]),
                 "--data", str(path), "--val-fraction", "0.3", "--out", str(out)]) == 0
    result = json.loads((out / "spm_eval.json").read_text())
    assert result["val_fraction"] == 0.3
    assert result["clean"]["spm"]["n"] == len(decided) == result["buckets"]["950"]["base"]["n"]
    with pytest.raises(ValueError, match="split='val' needs val_fraction > 0"):
        PickAPicStream(path, split="val")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_config(SPMTrainConfig, None, ["val_fraction=1.0"]).validate()


def test_wise_ft_interpolates_every_weight_between_start_and_tuned(small_spm):
    import copy

    from spo_studio.backend.preference.spm import average_weights, interpolate_weights

    start = small_spm
    tuned = copy.deepcopy(start)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    a, b = start.state_dict(), tuned.state_dict()
    for alpha in (0.0, 0.25, 1.0):
        mixed = interpolate_weights(start, tuned, alpha).state_dict()
        worst = max((mixed[k] - ((1 - alpha) * a[k] + alpha * b[k])).abs().max().item() for k in a)
        assert worst <= 1e-6, (alpha, worst)
    # α = 0 is the start: identity time conditioning, so the score equals the base scorer's for any t
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids = start.tokenize(["a red circle", "a blue square"])
    zero = interpolate_weights(start, tuned, 0.0)
    with torch.no_grad():
        assert torch.allclose(zero(images, ids, torch.tensor([0, 900])), start(images, ids, None), atol=1e-6)
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_weights(start, tuned, 1.5)
    # a uniform soup of three: the mean of every weight
    third = copy.deepcopy(tuned)
    with torch.no_grad():
        for p in third.parameters():
            p.mul_(-2.0)
    c = third.state_dict()
    soup = average_weights([start, tuned, third], [1 / 3] * 3).state_dict()
    assert max((soup[k] - (a[k] + b[k] + c[k]) / 3).abs().max().item() for k in a) <= 1e-6
    with pytest.raises(ValueError, match="must sum to 1"):
        average_weights([start, tuned], [0.5, 0.6])


def test_training_saves_the_wise_ft_interpolation_and_keeps_trained_checkpoints(tiny_dirs, tiny_spm, tmp_path):
    data = tmp_path / "pairs.parquet"
    write_pickapic(data, _pair_rows(12))
    common = [f"base_model={tiny_dirs['sd15']}", f"init={tiny_spm}", f"train_data={data}", "lr=1e-2",
              "warmup_steps=1", "batch_size=4", "max_steps=3", "checkpoint_every=3", "shuffle_buffer=0",
              f"output_dir={tmp_path / 'run'}"]
    trained = StepAwarePreferenceModel.load(train_spm(load_config(SPMTrainConfig, None, common))).state_dict()
    init = StepAwarePreferenceModel.load(tiny_spm).state_dict()
    assert max((trained[k] - init[k]).abs().max().item() for k in init) > 1e-3  # it did learn
    # the same run with α = 0.5: resumes at its last checkpoint (α may change) and saves the midpoint
    out = train_spm(load_config(SPMTrainConfig, None, common + ["wise_alpha=0.5"]))
    mixed = StepAwarePreferenceModel.load(out).state_dict()
    worst = max((mixed[k] - (init[k] + trained[k]) / 2).abs().max().item() for k in init)
    assert worst <= 1e-6, worst
    assert json.loads((out / "spm.json").read_text())["wise_alpha"] == 0.5


def test_distillation_trains_toward_the_frozen_start_on_the_clean_pair(tiny_dirs, tiny_spm, tmp_path, monkeypatch):
    from spo_studio.backend.preference import train as train_module
    from spo_studio.backend.preference.train import images_tensor

    rows = _pair_rows(4)
    data = tmp_path / "pairs.parquet"
    write_pickapic(data, rows)
    seen = []
    real_loss = train_module.preference_loss

    def spy(s0, s1, q0, q1):
        seen.append((q0.detach().clone(), q1.detach().clone()))
        return real_loss(s0, s1, q0, q1)

    monkeypatch.setattr(train_module, "preference_loss", spy)
    common = [f"base_model={tiny_dirs['sd15']}", f"init={tiny_spm}", f"train_data={data}", "batch_size=4",
              "max_steps=2", "shuffle_buffer=0", "lr=1e-2", "warmup_steps=1", "distill_weight=0.4",
              f"output_dir={tmp_path / 'run'}"]
    train_spm(load_config(SPMTrainConfig, None, common))
    # the teacher, by hand: the starting scorer on the clean (one-colour, so any size) images, no t
    start = StepAwarePreferenceModel.load(tiny_spm).eval()
    images = images_tensor([_decode(r["jpg_0"]) for r in rows] + [_decode(r["jpg_1"]) for r in rows], 16)
    with torch.no_grad():
        s = start(images, start.tokenize([r["caption"] for r in rows] * 2), None)
    p0 = torch.softmax(torch.stack(s.chunk(2), dim=-1), dim=-1)[:, 0]
    labels = torch.tensor([r["label_0"] for r in rows])
    for q0, q1 in seen:  # both steps: the teacher is frozen, so the targets stay the same
        assert torch.allclose(q0, 0.6 * labels + 0.4 * p0, atol=1e-5)
        assert torch.allclose(q0 + q1, torch.ones(4), atol=1e-6)
    assert len(seen) == 2 and not torch.allclose(seen[0][0], labels, atol=1e-3)
    # a scratch init has no teacher, nor has a plain scorer's training
    for bad in (["init=scratch:pocket"], ["step_aware=false"]):
        with pytest.raises(ValueError, match="distill_weight > 0 needs step_aware=true and a trained init"):
            train_spm(load_config(SPMTrainConfig, None, common + bad))


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
