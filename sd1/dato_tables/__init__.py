"""The paper's tables: run each table's method rows through the generation API and the method registry,
measure them with sdeval, and show our numbers next to the paper's.

Modules:
- `spec`: the table specs (data/tables.yaml: settings, models, datasets, method rows) as typed values.
- `settings`: the command-line options and settings of a run, the method rows with their templates filled.
- `plan`: one run decided up front from the command line and the environment (every problem at once).
- `driver`: run a plan: generate each row's images (prompt sets or img2img sets), measure, record.
- `evaluation`: the one link to sdeval (FID, CLIP score, Inception Score of an image folder).
- `records`: table.json, rows.jsonl, results.md of a table folder.
- `paper`: the paper's numbers (data/paper-tables.yaml); `report`: ours next to them (collect.py).
- `smoke`: stand-in data and weights for --smoke runs. `cli`: `python -m dato_tables TABLE`.
"""
