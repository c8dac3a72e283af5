"""Regenerate the bundled sample scenes (mllm_ris/assets/scenes/): SynthRef scenes + scenes.json.

python scripts/make_sample_scenes.py [--out DIR] [--count 5] [--seed 2024] [--size 128]
"""

from __future__ import annotations

import argparse

from mllm_ris.inference.scenes import ASSETS_DIR, make_sample_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(ASSETS_DIR / "scenes"), help="output folder (default: %(default)s)"
    )
    parser.add_argument("--count", type=int, default=5, help="number of scenes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2024, help="SynthRef seed (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image side, px (default: %(default)s)")
    args = parser.parse_args()
    scenes = make_sample_scenes(args.out, count=args.count, seed=args.seed, size=args.size)
    for scene in scenes:
        print(f"{scene.path}: {len(scene.queries)} queries, {len(scene.chat)} chat turns")


if __name__ == "__main__":
    main()
