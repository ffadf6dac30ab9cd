#!/usr/bin/env bash
# The shapes tables: Table 1 (method rows, DaTo b1 in both readings), Table 3 (CFG alignment) and Table 4
# (DiffScore source) on the shapes model (sd1/shapesworld; weights models/shapes/shapes-demo.safetensors or
# SHAPES_CKPT): prompt accuracy, FID against the shapes world's own images, fidelity to the Original, speed-up.
# Runs table1_shapes, table3_shapes, table4_shapes one after the other (each: TABLE --help for rows and settings);
# the specs: sd1/dato_tables/data/tables.yaml. About 16 minutes on 2 CPU cores (measured).
# Usage: OUT_DIR=... scripts/tables/shapes.sh [--smoke] [--dry-run] [--out DIR] [--limit N] [--batch-size N] [--rows ID,...]
exec "${PYTHON:-python}" -m dato_tables shapes "$@"
