"""Build a COCO caption prompt set (n distinct images, one caption each, fixed seed): see
`sdeval.make_coco_prompts` (or --help)."""
import sys

from sdeval.make_coco_prompts import cli

if __name__ == "__main__":
    sys.exit(cli())
