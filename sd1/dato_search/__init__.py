"""NSGA-II search of a per-step DaTo strategy (spec 8): cache depths, prune ratios, or both.

Command line: scripts/search_depth.py, search_ratio.py and search_joint.py (``dato_search.cli``).

Modes (``--mode``; each script sets its own default):

- ``depth``: one cache depth per step from ``--depth-space`` (default {0, 1, 12}); pruning off, or a fixed
  ``--prune_ratio`` at every step.
- ``ratio``: one prune ratio per step from ``--ratio-space`` (default {0.3, ..., 0.7}) under the fixed cache
  depths of ``--cache_strategy`` (default the shipped ``b1``).
- ``joint``: both at once.

The decision variables are indices into the search spaces: depth variables for steps 1..S-1 (step 0 always
computes everything, spec 2, so its depth is fixed to 12), ratio variables for every step that runs (a step
at depth 0 reuses everything and does not prune, so its ratio is fixed to 0). Decoding always gives this
canonical strategy, so two index vectors that run the same computation share one evaluation.

The search is pymoo's NSGA-II with the paper's settings: population 20, 100 generations, integer sampling
seeded with uniform strategies (all-full, then DeepCache "every N-th step full" for N = 2..5 at each
partial depth, 1 first; constant ratios for ratio search), SBX (probability 0.7, eta 7) and polynomial
mutation (probability 0.4, eta 15) on real values with rounding repair, duplicates eliminated.
``--seed-intervals`` sets those N (e.g. 2,3,4,5,8,12,16 adds every 8th, 12th and 16th step full), so that
the first population can already reach the fast end of the space; ``--min-speedup X`` makes "at least X times faster than
the full model" (cost-table prediction) a constraint: pymoo ranks feasible strategies first and infeasible ones
by how far they miss, and the front, the choice and ``best.yaml`` are of feasible strategies (the front of all
points until one is feasible). ``front.json`` keeps the full model's point when it was a candidate (depth and
joint search: the first seed), the reference any quality drop is measured from.

Objectives (both minimised):

- quality, ``--quality``: see ``dato_search.objectives`` (default ``fidelity``, the relative RMS error in
  percent of the final latents against the unaccelerated run of the same prompts and seeds);
- latency in seconds per image, ``--latency``: ``table`` (default) predicts it from the per-step cost table
  (``sdgen.costs``; measured once, stored in ``RUN_DIR/costs.json``, deterministic, no extra UNet calls),
  ``measured`` takes the wall clock of the candidate's sampler loop.

Choosing one strategy from the front (spec 8): the point minimising ``quality + w_M * latency``, where with
``--select raw`` (default) quality is in its own units and latency in milliseconds per image (the scale on
which the paper's w_M range, 0.025 = quality first to 0.16 = speed first, trades a few FID points against
hundreds of milliseconds), and with ``--select normalized`` both objectives are first scaled to [0, 1] over
the front. The fidelity objective is in percent so that the raw weighting stays meaningful for it too.

Resuming: every evaluated strategy is a row of ``RUN_DIR/evals.sqlite``, committed as soon as it is done and
keyed by a SHA-256 of (canonical strategy, objective settings, model identity, prompts, seeds, sampler
settings, device). The algorithm is re-run from its seed with pymoo's ask/tell interface and every candidate
already stored is served from the file, so restarting the same command (after a crash or Ctrl-C) replays the
finished generations without computing anything and continues where it stopped (a raised ``--gens`` extends
a finished search). The run directory remembers its settings in ``search.json``: a rerun with other settings
is refused, naming the differences, unless ``--new-search`` starts a new search there (``dato_search.rundir``);
one search at a time holds it (a lock on ``RUN_DIR/search.lock``: a second one is refused with the PID of the
first, and the lock of a search that died is taken over), and a damaged ``evals.sqlite`` is refused before the
model is built.
Counts of evaluations performed and served from the store are logged, kept per run in the ``invocations``
table and per candidate in the ``asks`` table.

Scale-out: ``--workers N`` starts a Dask ``LocalCluster`` (N processes, 1 thread each), ``--scheduler
ADDRESS`` joins a running cluster. Each worker builds its model once, in a worker plugin
(``dato_search.dask_worker.SearchWorkerPlugin``), and evaluates the generation's new strategies in parallel.
Evaluation is deterministic (per-image seeds, fixed batches, fixed torch thread count ``--threads``), and the
cost-table latency is computed in the main process, so the front equals a serial run's. (``--latency
measured`` is a wall clock: it varies from run to run and with the load of the workers sharing a device. It is
stored with each evaluation, so a resumed search reuses it.)

Outputs in ``RUN_DIR``: ``front.json`` (the Pareto front over every candidate of the search, each point with
its strategy, quality and latency, and the chosen point), ``front.png`` (quality vs latency, every evaluated
point faint, the front highlighted, the chosen point starred), ``best.yaml`` (a strategy for
``scripts/txt2img.py --dato --strategy``), ``progress.json``, ``search.json`` and ``search.log``; all are
rewritten (atomically) after every generation.

Modules: ``cli`` (command line), ``settings`` (resolve and check), ``rundir`` (search.json, rerun check),
``space`` (decision variables), ``objectives`` (one class per quality metric), ``evaluator`` (sample and
score a candidate through ``sdgen.generate``), ``latency`` (cost table), ``backends`` (serial, Dask),
``store`` (evals.sqlite), ``loop`` (NSGA-II ask/tell), ``front`` (Pareto front, choice), ``report`` (outputs,
log), ``run`` (one search in its run directory), ``identity`` (digests), ``dask_worker`` (the Dask worker plugin).
"""
