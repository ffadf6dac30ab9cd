"""sdgen: the generation layer of DaTo-SD. `generate` is the generation API (load, encode, sample, decode),
`methods` the registry of acceleration methods, `runtime` device/precision/threads/seeds, `images` image
files, `resources` the shipped configs, strategies and prompt lists, `cli` the command-line front ends."""
