"""Training: preference data in, profile files out, and the offline evaluation of profiles.

The RAHF method, one module a step (as adapted in ../shared/docs/RAHF.md): `instruct` (step 1, SCIT or Dual
LoRA; peft, imported only when an adapter is added), `collect` (step 2, activity patterns, and
`record_layers`, how every fit reads layer states), `fit` (step 3, offsets and low-rank terms towards the
patterns, its LoRA form, the closed-form baselines, `make_profile`); `pref` (this project's preference-loss
fit, not RAHF) and `loop` (seeds, checkpoints, batch draws and the optimiser loop the fits share). Around
them: `data` (preference pairs, encoding, batches), `evaluate` (preference accuracy, perplexity,
generations, the Markdown report: matplotlib), `pipeline` (resumable stages of a run), `compare`
(`rahf compare`), `pipeline_cli` and `cli_options` (`rahf train` / `rahf eval` and what they share with
`compare`), `conditions` (fitting a profile's condition probe: `rahf profiles condition`) and `quickfit`
(profiles from a few contrastive examples, forward passes only: the server's fit route); `judge` and
`judge_build` (the generation judge: a reward model on a judge split no fit or calibration uses) and
`genmetrics` (what replies are scored by, and the half-split strength choice).

Imports the core (`steering_vectors.core`) and never the other way round; nothing here imports server
code. Within the package the steps import in one direction: loop ← instruct ← collect ← fit, evaluate ←
pref, and the commands on top (`python scripts/check_imports.py` fails on any import circle).
"""
