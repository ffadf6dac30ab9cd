"""sdgen: the generation layer of DaTo-SD. `generate` is the generation API (load, encode, sample, decode),
`settings` the run settings every job carries, `samplers` the samplers by name, `methods` the registry of
acceleration method kinds, `runtime` device/precision/threads/seeds, `images` image files, `prompts` prompt
files, `resources` the shipped configs and prompt lists, `benchmark` / `costs` / `diffusers_bench` the
benchmarks (timing, MAC counts, the per-call cost table), `cli` the command-line front ends."""
