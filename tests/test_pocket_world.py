"""The pocket world (generator, grammar, held-out split) and its two judges (alignment, aesthetic).

Numbers are printed (run with ``-s`` to see them); every assertion is on real measurements.
"""

import time

import numpy as np
import pytest
from PIL import Image
from spo_studio.backend.pocket import degrade, judges, world

# ---------------------------------------------------------------------------------------------------------------------
# Shared samples


@pytest.fixture(scope="module")
def split():
    return world.prompt_split()


@pytest.fixture(scope="module")
def all_combo_samples(split):
    """Every base combination (train and held-out) twice, with random layout: 300 samples."""
    out = []
    for i, combo in enumerate(world.all_combinations()):
        for rep in range(2):
            out.append(world.render(world.Attributes(*combo), seed=10_000 + 2 * i + rep))
    return out


@pytest.fixture(scope="module")
def mixed_samples():
    """100 training and 50 held-out samples with layout words in about half of the prompts."""
    return world.samples(100, seed=5, split="train") + world.samples(50, seed=6, split="held_out")


# ---------------------------------------------------------------------------------------------------------------------
# Grammar and parser


def test_vocabulary_is_whole_words_and_covers_every_prompt(split):
    assert len(world.VOCABULARY) == len(set(world.VOCABULARY))
    assert all(w and w == w.strip().lower() and " " not in w for w in world.VOCABULARY)
    assert len(world.SHAPES) >= 4 and len(world.COLOURS) >= 6
    for name in ("train", "held_out"):
        for prompt in split.prompts(name):
            assert set(prompt.split()) <= set(world.VOCABULARY)
    full = world.Attributes("star", "red", "blue", "small", "center").prompt()
    assert full == "a small red star in the center on a blue background"
    assert set(full.split()) <= set(world.VOCABULARY)


def test_palette_is_well_separated():
    rgb = np.array(list(world.COLOURS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)
    min_dist = d[np.triu_indices(len(rgb), 1)].min()
    print(f"\npalette: {dict(world.COLOURS)}; minimum pairwise RGB distance {min_dist:.1f}")
    assert min_dist > 100


def test_parse_prompt_round_trips_every_form():
    for shape in world.SHAPES:
        for size in (None, *world.SIZES):
            for position in (None, *world.POSITIONS):
                attrs = world.Attributes(shape, "green", "white", size, position)
                assert world.parse_prompt(attrs.prompt()) == attrs
    assert world.parse_prompt("  A Red Circle on a Blue background. ") == world.Attributes("circle", "red", "blue")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a red dog on a blue background", "unknown word(s) ['dog']"),
        ("a pink circle on a teal background", "['pink', 'teal']"),
        ("a red circle on a red background", "must differ"),
        ("red circle on a blue background", "expected 'a'"),
        ("a red circle on a blue", "expected 'background'"),
        ("a red circle at the center on a blue background", "unknown position phrase"),
        ("a red circle on a blue background a", "trailing"),
        ("a circle red on a blue background", "foreground colour"),
    ],
)
def test_parse_prompt_rejects_prompts_outside_the_grammar(text, fragment):
    with pytest.raises(ValueError) as err:
        world.parse_prompt(text)
    assert fragment in str(err.value)


def test_attributes_validate():
    with pytest.raises(ValueError, match="must differ"):
        world.Attributes("circle", "red", "red")
    with pytest.raises(ValueError, match="unknown shape"):
        world.Attributes("hexagon", "red", "blue")


# ---------------------------------------------------------------------------------------------------------------------
# Held-out split


def test_split_is_fixed_disjoint_and_keeps_every_word_and_pair_in_training(split):
    combos = world.all_combinations()
    train, held = set(split.train), set(split.held_out)
    print(f"\nsplit: {len(train)} train / {len(held)} held-out base combinations of {len(combos)}")
    assert not train & held
    assert train | held == set(combos)
    assert 0.12 <= len(held) / len(combos) <= 0.18
    assert world.prompt_split() == split  # deterministic
    assert world.prompt_split(seed=1) != split  # but seeded
    for i, words in enumerate((world.SHAPES, world.COLOUR_NAMES, world.COLOUR_NAMES)):
        assert {c[i] for c in train} == set(words)
    for shape, fg, bg in held:
        assert any(c[0] == shape and c[1] == fg for c in train)
        assert any(c[0] == shape and c[2] == bg for c in train)
        assert any(c[1] == fg and c[2] == bg for c in train)


def test_sampling_respects_the_split(split):
    train = world.samples(200, seed=3, split="train")
    held = world.samples(100, seed=4, split="held_out")
    assert all(split.split_of(s.attributes) == "train" for s in train)
    assert all(split.split_of(s.attributes) == "held_out" for s in held)
    with_layout = sum(s.prompt != world.Attributes(*s.attributes.combination).prompt() for s in train)
    assert 0.5 * len(train) < with_layout < 0.9 * len(train)  # P(size or position word) = 0.75


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def test_rendering_is_deterministic_and_seeded():
    a = world.sample(123)
    b = world.sample(123)
    assert a.image.tobytes() == b.image.tobytes() and a.prompt == b.prompt
    attrs = world.Attributes("cross", "yellow", "purple")
    assert world.render(attrs, 7).image.tobytes() == world.render(attrs, 7).image.tobytes()
    assert world.render(attrs, 7).image.tobytes() != world.render(attrs, 8).image.tobytes()
    assert world.sample(124).image.tobytes() != a.image.tobytes()


@pytest.mark.parametrize("size", [32, 64, 96])
def test_sample_ground_truth_is_consistent(size):
    for seed in range(20):
        s = world.sample(seed, image_size=size)
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (size, size) and s.mask.dtype == bool
        x0, y0, x1, y1 = s.bbox
        ys, xs = np.nonzero(s.mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert s.attributes.size in world.SIZES and s.attributes.position in world.POSITIONS
        fg, bg = np.array(world.COLOURS[s.attributes.fg]), np.array(world.COLOURS[s.attributes.bg])
        assert np.abs(s.image[s.alpha >= 0.999].astype(int) - fg).max() <= 1
        assert np.abs(s.image[s.alpha <= 0.001].astype(int) - bg).max() <= 1
        assert 0.01 < s.mask.mean() < 0.4
        # Anti-aliased: some intermediate pixels, and the object stays inside the frame.
        assert ((s.alpha > 0.05) & (s.alpha < 0.95)).any()
        assert not s.mask[0].any() and not s.mask[-1].any() and not s.mask[:, 0].any() and not s.mask[:, -1].any()


def test_layout_words_control_size_and_position():
    for seed in range(10):
        big = world.render(world.Attributes("circle", "red", "blue", "large", "center"), seed)
        small = world.render(world.Attributes("circle", "red", "blue", "small", "center"), seed)
        assert big.mask.sum() > 2 * small.mask.sum()
        left = world.render(world.Attributes("square", "red", "blue", None, "left"), seed)
        right = world.render(world.Attributes("square", "red", "blue", None, "right"), seed)
        top = world.render(world.Attributes("square", "red", "blue", None, "top"), seed)
        assert left.centre[0] < 32 - 5 < 32 + 5 < right.centre[0]
        assert top.centre[1] < 32 - 5


def test_rasterize_is_exact_for_areas():
    for shape in world.SHAPES:
        pts = world.place_polygon(world.shape_polygon(shape), (20.3, 19.6), 9.1, 17.0)
        cover = world.rasterize(pts, 40, 40, supersample=16)
        assert abs(float(cover.sum()) - world.polygon_area(pts)) < 0.01 * world.polygon_area(pts)
    batch = world.place_polygon(world.shape_polygon("star"), (20, 20), 9, np.array([0.0, 36.0]))
    covers = world.rasterize(batch, 40, 40)
    assert covers.shape == (2, 40, 40) and np.abs(covers[0] - covers[1]).max() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Alignment judge


def _alignment_accuracy(samples, transform=None, seed=0):
    oks = []
    for i, s in enumerate(samples):
        img = s.image if transform is None else transform(s, np.random.default_rng(seed + i))
        oks.append(judges.alignment(img, s.prompt)["all_ok"])
    return float(np.mean(oks))


def test_alignment_is_accurate_on_clean_images_of_every_prompt(all_combo_samples, split):
    t = time.perf_counter()
    held = [s for s in all_combo_samples if split.split_of(s.attributes) == "held_out"]
    train = [s for s in all_combo_samples if split.split_of(s.attributes) == "train"]
    acc_train, acc_held = _alignment_accuracy(train), _alignment_accuracy(held)
    dt = (time.perf_counter() - t) / len(all_combo_samples)
    print(
        f"\nalignment on clean images: train {acc_train:.3f} (n={len(train)}), held-out {acc_held:.3f} "
        f"(n={len(held)}); {1000 * dt:.1f} ms per image"
    )
    assert acc_train >= 0.98 and acc_held >= 0.98


@pytest.mark.parametrize(
    "name, transform",
    [
        ("blur sigma=1.0", lambda s, rng: degrade.gaussian_blur(s.image, 1.0)),
        ("noise sigma=0.04", lambda s, rng: degrade.gaussian_noise(s.image, rng, 0.04)),
        ("blur 1 + noise 0.04", lambda s, rng: degrade.gaussian_noise(degrade.gaussian_blur(s.image, 1.0), rng, 0.04)),
    ],
)
def test_alignment_is_robust_to_mild_blur_and_noise(mixed_samples, name, transform):
    acc = _alignment_accuracy(mixed_samples, transform, seed=77)
    print(f"\nalignment under {name}: {acc:.3f} (n={len(mixed_samples)})")
    assert acc >= 0.95


def test_alignment_detects_wrong_prompts(mixed_samples):
    s = mixed_samples[0]
    a = s.attributes
    other_shape = next(x for x in world.SHAPES if x != a.shape)
    other_fg = next(x for x in world.COLOUR_NAMES if x not in (a.fg, a.bg))
    other_bg = next(x for x in world.COLOUR_NAMES if x not in (a.fg, a.bg, other_fg))
    r = judges.alignment(s.image, world.Attributes(other_shape, a.fg, a.bg).prompt())
    assert not r["shape_ok"] and r["fg_ok"] and r["bg_ok"] and not r["all_ok"] and r["score"] == pytest.approx(2 / 3)
    r = judges.alignment(s.image, world.Attributes(a.shape, other_fg, other_bg).prompt())
    assert r["shape_ok"] and not r["fg_ok"] and not r["bg_ok"] and r["score"] == pytest.approx(1 / 3)
    blank = np.full((64, 64, 3), world.COLOURS["red"], dtype=np.uint8)
    r = judges.alignment(blank, "a blue circle on a red background")
    assert r["bg_ok"] and not r["fg_ok"] and not r["shape_ok"] and r["shape"] is None


def test_judges_validate_input_and_accept_pil():
    s = world.sample(0)
    assert judges.alignment(Image.fromarray(s.image), s.prompt) == judges.alignment(s.image, s.prompt)
    assert judges.aesthetic(Image.fromarray(s.image)) == judges.aesthetic(s.image)
    with pytest.raises(ValueError, match="unknown word"):
        judges.alignment(s.image, "a red dragon on a blue background")
    with pytest.raises(ValueError, match="uint8 RGB"):
        judges.aesthetic(s.image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        judges.aesthetic(s.image[..., 0])
    with pytest.raises(ValueError, match="images but"):
        judges.alignment_batch([s.image], [])
    assert judges.aesthetic_batch([s.image, s.image]) == [judges.aesthetic(s.image)] * 2


def test_label_components():
    m = np.zeros((8, 8), dtype=bool)
    m[1:3, 1:4] = True  # 6 px
    m[5, 5] = m[6, 6] = True  # diagonal pair: one component with 8-connectivity, two with 4
    labels, sizes = judges.label_components(m, connectivity=8)
    assert sizes.tolist() == [6, 2] and labels[1, 1] == 1 and labels[6, 6] == 2
    _, sizes4 = judges.label_components(m, connectivity=4)
    assert sizes4.tolist() == [6, 1, 1]
    assert judges.label_components(np.zeros((4, 4), dtype=bool))[1].size == 0


# ---------------------------------------------------------------------------------------------------------------------
# Aesthetic judge

DEGRADATIONS = {
    "gaussian blur sigma=1": lambda s, rng: degrade.gaussian_blur(s.image, 1.0),
    "gaussian noise sigma=0.03": lambda s, rng: degrade.gaussian_noise(s.image, rng, 0.03),
    "speckle 1%": lambda s, rng: degrade.speckle(s.image, rng, 0.01),
    "clutter 1 blob": lambda s, rng: degrade.clutter(s.image, rng, 1, alpha=s.alpha),
    "halo 2px": lambda s, rng: degrade.halo(s.image, s.alpha, width=2.0, strength=0.5),
    "soft edges 1.5px": lambda s, rng: degrade.soft_edges(s.image, s.alpha, 1.5),
    "smudge 0.04": lambda s, rng: degrade.smudge(s.image, rng, amplitude=0.04),
}


@pytest.fixture(scope="module")
def aesthetic_scores(mixed_samples):
    samples = mixed_samples[:100]
    t = time.perf_counter()
    clean = np.array([judges.aesthetic(s.image) for s in samples])
    degraded = {
        name: np.array([judges.aesthetic(f(s, np.random.default_rng(500 + i))) for i, s in enumerate(samples)])
        for name, f in DEGRADATIONS.items()
    }
    per_image = (time.perf_counter() - t) / (len(samples) * (1 + len(DEGRADATIONS)))
    return samples, clean, degraded, per_image


def test_aesthetic_prefers_clean_images_to_their_degraded_versions(aesthetic_scores):
    samples, clean, degraded, per_image = aesthetic_scores
    print(
        f"\naesthetic: clean min {clean.min():.3f} median {np.median(clean):.3f} (n={len(clean)}); "
        f"{1000 * per_image:.1f} ms per image"
    )
    for name, scores in degraded.items():
        acc = float(np.mean(clean > scores))
        print(
            f"  {name:28s} pairwise accuracy {acc:.3f}, degraded median {np.median(scores):.3f} max {scores.max():.3f}"
        )
        assert acc >= 0.95, name


def test_aesthetic_scores_trivial_images_below_every_clean_image(aesthetic_scores):
    _, clean, _, _ = aesthetic_scores
    rng = np.random.default_rng(0)
    size = 64
    trivial = {f"blank {name}": np.full((size, size, 3), rgb, dtype=np.uint8) for name, rgb in world.COLOURS.items()}
    trivial["uniform noise"] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    trivial["grey gaussian noise"] = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    blue = np.full((size, size, 3), world.COLOURS["blue"], dtype=np.uint8)
    trivial["40 small blobs"] = degrade.clutter(blue, rng, 40)
    trivial["200 tiny blobs"] = degrade.clutter(blue, rng, 200, radius=(0.6, 1.2))
    trivial["15 larger blobs"] = degrade.clutter(blue, rng, 15, radius=(3.0, 5.0))
    half = blue.copy()
    half[:, size // 2 :] = world.COLOURS["yellow"]
    trivial["two halves"] = half
    checker = ((np.add.outer(np.arange(size) // 8, np.arange(size) // 8)) % 2).astype(bool)
    board = blue.copy()
    board[checker] = world.COLOURS["white"]
    trivial["checkerboard"] = board
    ramp = np.linspace(0, 255, size)
    trivial["grey ramp"] = np.repeat(np.tile(ramp, (size, 1))[..., None], 3, axis=2).astype(np.uint8)
    scores = {name: judges.aesthetic(img) for name, img in trivial.items()}
    print(f"\ntrivial images: max {max(scores.values()):.4f} vs clean min {clean.min():.3f}")
    for name, score in scores.items():
        print(f"  {name:22s} {score:.4f}")
        assert score < clean.min(), name
        assert score < 0.1, name


def test_aesthetic_is_independent_of_layout_shape_and_colours(aesthetic_scores):
    _, clean, degraded, _ = aesthetic_scores
    # A full grid of layouts: every shape x size x position, colours rotating through the palette.
    grid_clean, grid_blur, keys = [], [], []
    colours = world.COLOUR_NAMES
    i = 0
    for shape in world.SHAPES:
        for size in world.SIZES:
            for position in world.POSITIONS:
                fg, bg = colours[i % 6], colours[(i + 1 + (i // 6) % 5) % 6]
                s = world.render(world.Attributes(shape, fg, bg, size, position), seed=900 + i)
                grid_clean.append(judges.aesthetic(s.image))
                grid_blur.append(judges.aesthetic(degrade.gaussian_blur(s.image, 1.0)))
                keys.append((shape, size, position))
                i += 1
    grid_clean, grid_blur = np.array(grid_clean), np.array(grid_blur)
    gap = float(np.median(clean) - np.median(degraded["gaussian blur sigma=1"]))
    spread_clean = float(grid_clean.max() - grid_clean.min())
    group_medians = {
        key: float(np.median([b for k, b in zip(keys, grid_blur) if key in k]))
        for key in (*world.SHAPES, *world.SIZES, *world.POSITIONS)
    }
    spread_blur = max(group_medians.values()) - min(group_medians.values())
    print(
        f"\nlayout independence (n={len(keys)} layouts): clean spread {spread_clean:.4f}, "
        f"clean-vs-blur gap {gap:.3f}; "
        f"blurred images' per-shape/size/position medians span {spread_blur:.3f} "
        f"({min(group_medians.values()):.3f}-{max(group_medians.values()):.3f})"
    )
    assert spread_clean <= 0.1 * gap
    assert spread_blur <= 0.25 * gap


# ---------------------------------------------------------------------------------------------------------------------
# Preference data


def test_preference_data_chunks_are_independent_and_summaries_count_all(monkeypatch):
    from spo_studio.backend.pocket import preference_data as pdata

    def fake_sampler(model, prompts, seeds, cfg):  # world renders stand in for the pocket model's samples
        return [world.sample(s % 100_000, image_size=32).image for s in seeds]

    monkeypatch.setattr(pdata, "sample_images", fake_sampler)
    cfg = pdata.PreferenceDataConfig(per_prompt=3)
    one, s1 = pdata.build_pairs(None, 4, (1,), cfg)
    two, s2 = pdata.build_pairs(None, 4, (1, 3), cfg)
    assert len(one) == 4 * 3 and len(two) == 2 * len(one)
    assert two[: len(one)] == one  # adding a chunk leaves the first chunk's rows unchanged
    assert {r["image_0_uid"].split("-")[0] for r in two[len(one):]} == {"3"}
    assert two[len(one)]["jpg_0"] != one[0]["jpg_0"]
    assert (s2["pairs"], s2["prompts"], s2["images"]) == (24, 8, 24) and (s1["prompts"], s1["images"]) == (4, 12)
    ties = sum(r["label_0"] == 0.5 for r in two)
    assert s2["tie_rate"] == pytest.approx(ties / 24)
