"""The pocket model's world: a tiny synthetic text-to-image domain in which the whole mission runs offline on a CPU.

Modules (import them directly; this package imports nothing heavy). What the name `pocket` resolves to
(model, scorer, SPM, prompts, preference pairs) is written in `backend/sources.py`.

- `world`: a seeded, deterministic generator of coloured shapes on coloured backgrounds, the prompt grammar
  (`VOCABULARY`, `parse_prompt`) and the fixed train / held-out split of prompt combinations.
- `judges`: the two evaluation-only judges, `alignment(image, prompt)` (does the image show the prompt's shape and
  colours, from pixels alone) and `aesthetic(image)` (a fixed, documented, layout-independent image-quality score).
- `degrade`: seeded image degradations (blur, noise, speckle, clutter, halo, soft edges, smudges) used to test the
  aesthetic judge and to illustrate what it penalises.
"""
