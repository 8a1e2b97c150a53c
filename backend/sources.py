"""Named sources, resolved in one place: what the word "pocket" means for each kind of input.

Every config field that takes a model, a scorer, prompts or preference pairs accepts either a local
path or a *name*. The one name today is `pocket`, the tiny model this repository builds and ships
under `backend/pocket/` (`spo pocket build`):

    base model        pocket            → POCKET_MODEL_DIR (read by `models.load_model`)
    SPM               pocket            → POCKET_SPM_DIR, the step-aware preference model
                      pocket-latent     → POCKET_LSPM_DIR, the latent step-aware preference model
    scorer            pocket            → POCKET_SCORER_DIR, the plain (clean-image) scorer
    prompts           pocket            → the pocket world's training prompts
                      pocket-train, pocket-held-out → the two sides of its prompt split
    preference pairs  pocket            → POCKET_TRAIN_PAIRS (Pick-a-Pic schema)

The trainer (`train/`) and the SPM code (`preference/`) ask this module and never import the pocket
package themselves. The pocket package is imported here only when its prompts are asked for.

Prompt files are read by `read_prompt_file`, the one reader of the trainer, the evaluation and the
studio page: .txt (one prompt per line), .json (a list of strings) or .parquet (a `caption` or
`prompt` column); blank entries are dropped; size, count and length are bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

POCKET = "pocket"
POCKET_ROOT = Path(__file__).resolve().parent / "pocket"
POCKET_MODEL_DIR = POCKET_ROOT / "model"
POCKET_SCORER_DIR = POCKET_ROOT / "scorer"
POCKET_SPM_DIR = POCKET_ROOT / "spm"
POCKET_LSPM_DIR = POCKET_ROOT / "lspm"
POCKET_LATENT = "pocket-latent"  # a name for the `spm` field only
POCKET_DATA_DIR = POCKET_ROOT / "data"
POCKET_TRAIN_PAIRS = POCKET_DATA_DIR / "pairs_train.parquet"
POCKET_HELD_OUT_PAIRS = POCKET_DATA_DIR / "pairs_held_out.parquet"
POCKET_PROMPT_SETS = {"pocket": "train", "pocket-train": "train", "pocket-held-out": "held_out"}

MAX_PROMPTS_BYTES = 20 * 2**20  # a .txt / .json prompt list
MAX_PARQUET_BYTES = 2 * 2**30  # a parquet (prompts or Pick-a-Pic pairs)
MAX_PROMPTS = 200_000
MAX_PROMPT_CHARS = 2000
PROMPT_SUFFIXES = (".txt", ".json", ".parquet")


def is_named(value) -> bool:
    """True when `value` is a source name (`pocket`) rather than a path."""
    return str(value) == POCKET


def _built(path: Path, marker: str, what: str) -> Path:
    if not (path / marker).exists():
        raise FileNotFoundError(f"{path}: the pocket {what} is not built; run `spo pocket build`")
    return path


# ----------------------------------------------------------------------------------------------
# Models: SPM and scorer (the base model: `models.load_model`, from POCKET_MODEL_DIR)
# ----------------------------------------------------------------------------------------------


def spm(spec: str | Path) -> str | Path:
    """An SPM source: `pocket` → the shipped pocket SPM folder, `pocket-latent` → the shipped pocket latent SPM
    (each must be built); a path as given."""
    if str(spec) == POCKET_LATENT:
        return _built(POCKET_LSPM_DIR, "lspm.json", "latent SPM")
    return _built(POCKET_SPM_DIR, "spm.json", "SPM") if is_named(spec) else spec


def scorer(spec: str | Path) -> str | Path:
    """A plain scorer (CLIP / PickScore) source: `pocket` → the shipped pocket scorer; a path as given."""
    return _built(POCKET_SCORER_DIR, "spm.json", "scorer") if is_named(spec) else spec


# ----------------------------------------------------------------------------------------------
# Preference pairs
# ----------------------------------------------------------------------------------------------


def train_pairs(spec: str | Path) -> Path:
    """Preference pairs: `pocket` → the pocket world's training pairs; otherwise a Pick-a-Pic parquet path."""
    if is_named(spec):
        if not POCKET_TRAIN_PAIRS.exists():
            raise FileNotFoundError(f"{POCKET_TRAIN_PAIRS}: the pocket preference data is not built; run "
                                    "`spo pocket build --stage data`")
        return POCKET_TRAIN_PAIRS
    return Path(spec).expanduser()


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def prompts(spec: str | Path) -> list[str]:
    """`pocket` / `pocket-train` / `pocket-held-out` (the pocket prompt split), or a prompts file."""
    if str(spec) in POCKET_PROMPT_SETS:
        from .pocket import world

        return world.prompt_split().prompts(POCKET_PROMPT_SETS[str(spec)])
    return read_prompt_file(spec)


def check_size(path: Path, limit: int) -> None:
    """ValueError when the file is larger than `limit` bytes."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path.name}: {size / 2**20:.1f} MB is over the {limit / 2**20:.0f} MB limit "
                         f"for this kind of file")


def read_prompt_file(path: str | Path, max_bytes: int = MAX_PROMPTS_BYTES) -> list[str]:
    """Prompts of a .txt (one per line), .json (list of strings) or .parquet (`caption` or `prompt` column).

    Blank entries are dropped and the rest stripped. FileNotFoundError when the file is missing;
    ValueError, naming the file, when it has the wrong kind, is over `max_bytes` (parquet: over
    MAX_PARQUET_BYTES), is unreadable, holds no prompt, more than MAX_PROMPTS prompts, or a prompt
    longer than MAX_PROMPT_CHARS characters.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"{path.name}: prompts must be a .txt (one per line), .json (list of strings) "
                         f"or .parquet (a `caption` or `prompt` column) file")
    check_size(path, MAX_PARQUET_BYTES if suffix == ".parquet" else max_bytes)
    if suffix == ".parquet":
        found = parquet_strings(path, ("caption", "prompt"))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path.name}: not valid JSON ({exc})") from exc
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path.name}: expected a JSON list of strings, "
                             f"e.g. [\"a red circle\", \"a blue square\"]")
        found = data
    else:
        try:
            found = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path.name}: not UTF-8 text ({exc})") from exc
    found = [p.strip() for p in found if p and p.strip()]
    if not found:
        raise ValueError(f"{path.name}: no prompts in the file")
    if len(found) > MAX_PROMPTS:
        raise ValueError(f"{path.name}: {len(found)} prompts; at most {MAX_PROMPTS} are accepted")
    long = [i for i, p in enumerate(found) if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ValueError(f"{path.name}: prompt {long[0] + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return found


def parquet_strings(path: Path, names: tuple[str, ...]) -> list[str]:
    """The non-empty values of the first of `names` that is a column of the parquet file (ValueError if none)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise ValueError(f"{path.name}: not a readable parquet file ({exc})") from exc
    columns = pf.schema_arrow.names
    name = next((n for n in names if n in columns), None)
    if name is None:
        raise ValueError(f"{path.name}: needs a {' or '.join(repr(n) for n in names)} column; it has {columns}")
    values = pf.read(columns=[name]).column(name).to_pylist()
    if not all(v is None or isinstance(v, str) for v in values):
        raise ValueError(f"{path.name}: column {name!r} must hold strings")
    return [v for v in values if v]
